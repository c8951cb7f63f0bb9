"""The model every CPU benchmark trains (the embedded SmolLM2-135M-Instruct unless said), the LoRA presets and the
SFT settings the training benchmarks share."""

from __future__ import annotations

from peft import LoraConfig

from trl_ica.cli.assets import default_model_path, load_model  # noqa: F401 - re-exported for the benchmarks

#: Every linear layer of a Llama-style decoder layer.
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(dropout: float = 0.0) -> LoraConfig:
    """The recipes' LoRA: r = 16, alpha 32, on every linear layer."""
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def top_layer_lora(model, top_layers: int) -> LoraConfig:
    """LoRA r = 16 on every linear layer of the top `top_layers` decoder layers (a step costs little more than a
    forward: no gradient flows below them)."""
    layers = model.config.num_hidden_layers
    return LoraConfig(r=16, lora_alpha=32, target_modules=MODULES, task_type="CAUSAL_LM",
                      layers_to_transform=list(range(layers - top_layers, layers)))  # fmt: skip


def training_settings(out, args, seed) -> dict:
    """The SFT settings every quality run shares: constant lr, fp32 on the CPU, nothing saved. `args` gives `steps`,
    `batch_size` and `lr`."""
    return dict(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, seed=seed,
        learning_rate=args.lr, lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, disable_tqdm=True, logging_steps=args.steps, max_length=512, gradient_checkpointing=False,
    )  # fmt: skip
