"""`trl-ica sft|dpo|simpo`: TRL-style training scripts with ICA weighting, for `accelerate launch`.

They parse like TRL's own scripts (`TrlParser`): script, training (the ICA config) and model arguments, from the
command line and/or `--config recipe.yaml`, command-line flags overriding the YAML. Datasets are Hub names or local
json/jsonl/parquet files; the holdout is given the same way with `--holdout_name`.

    accelerate launch -m trl_ica.launch sft --config recipes/sft_lora.yaml
    trl-ica sft --config recipes/sft_lora.yaml --max_steps 2
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

TASKS = ("sft", "dpo", "simpo")


def _script_arguments():
    from trl import ScriptArguments

    @dataclass
    class ICAScriptArguments(ScriptArguments):
        """TRL's [`~trl.ScriptArguments`] (`dataset_name`, `dataset_config`, `dataset_train_split`,
        `dataset_test_split`, ...) plus the holdout, given the same ways.

        Args:
            holdout_name (`str`): the clean holdout set: a Hub dataset, a local folder of data files or a local
                .json/.jsonl/.parquet file.
            holdout_config (`str`, *optional*): its Hub configuration.
            holdout_split (`str`): its split (a local file has only `"train"`).
        """

        holdout_name: str | None = field(default=None, metadata={"help": "Holdout: Hub dataset, folder or file."})
        holdout_config: str | None = field(default=None, metadata={"help": "Hub configuration of the holdout."})
        holdout_split: str = field(default="train", metadata={"help": "Split of the holdout."})

    return ICAScriptArguments


def _classes(task: str):
    if task == "sft":
        from ..trainer.sft_config import ICASFTConfig
        from ..trainer.sft_trainer import ICASFTTrainer

        return ICASFTConfig, ICASFTTrainer
    if task == "dpo":
        from ..trainer.dpo_config import ICADPOConfig
        from ..trainer.dpo_trainer import ICADPOTrainer

        return ICADPOConfig, ICADPOTrainer
    from ..trainer.cpo_config import ICASimPOConfig
    from ..trainer.cpo_trainer import ICACPOTrainer

    return ICASimPOConfig, ICACPOTrainer


def _model_config():
    """TRL's `ModelConfig` with `dtype` unset by default (TRL's default is `"float32"`): see [`resolve_dtype`]."""
    from dataclasses import dataclass, field

    from trl import ModelConfig

    @dataclass
    class ICAModelConfig(ModelConfig):
        dtype: str | None = field(
            default=None,
            metadata={
                "help": "dtype to load the model in. Unset: with a PEFT adapter (LoRA, QLoRA) the training's "
                "mixed-precision dtype (bfloat16 under `bf16`, the default on a bf16 GPU), so the frozen base and "
                "its scoring run in it; a full fine-tune loads float32 weights, which mixed precision keeps as "
                "master weights.",
                "choices": ["auto", "bfloat16", "float16", "float32"],
            },
        )

    return ICAModelConfig


def resolve_dtype(model_args, training_args) -> str:
    """The dtype to load the model in: `model_args.dtype` when set; otherwise the training's mixed-precision dtype
    for a PEFT (LoRA or QLoRA) run, whose base weights are frozen, and float32 for a full fine-tune. Also the 4-bit
    compute dtype of QLoRA (TRL's `get_quantization_config` reads `dtype`)."""
    if model_args.dtype is not None:
        return model_args.dtype
    if getattr(model_args, "use_peft", False):
        if getattr(training_args, "bf16", False):
            return "bfloat16"
        if getattr(training_args, "fp16", False):
            return "float16"
    return "float32"


def make_parser(task: str):
    from trl import TrlParser

    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
    from trl import DatasetMixtureConfig

    config_cls, _ = _classes(task)
    return TrlParser(
        (_script_arguments(), config_cls, _model_config(), DatasetMixtureConfig), prog=f"trl-ica {task}"
    )


def load_training_data(script_args, training_args, dataset_args):
    """`(train, eval or None, holdout)`, loaded as TRL's scripts load theirs: a mixture (`datasets:` in the YAML) or
    `dataset_name` with `dataset_config`, then `dataset_train_split` (and `dataset_test_split` when evaluating)."""
    from trl import get_dataset

    from ..data_io import load_splits, pick_split

    if script_args.holdout_name is None:
        raise ValueError("`--holdout_name` is required: the clean holdout set that ICA conditions on.")
    if dataset_args.datasets:
        if script_args.dataset_name:
            raise ValueError(
                f"Give the training data once: `datasets` (a mixture) or `--dataset_name`, not both (got "
                f"{script_args.dataset_name!r} and {len(dataset_args.datasets)} mixture entries)."
            )
        splits, source = get_dataset(dataset_args), "the `datasets` mixture"
    elif script_args.dataset_name:
        source = script_args.dataset_name
        splits = load_splits(source, "--dataset_name", script_args.dataset_config)
    else:
        raise ValueError(
            "The training data is required: `--dataset_name` (a Hub dataset, a local folder or a .json/.jsonl/"
            ".parquet file) or a `datasets` mixture in the YAML."
        )
    train = pick_split(splits, script_args.dataset_train_split, source, "--dataset_train_split")
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = pick_split(splits, script_args.dataset_test_split, source, "--dataset_test_split")
    holdout_splits = load_splits(script_args.holdout_name, "--holdout_name", script_args.holdout_config)
    holdout = pick_split(holdout_splits, script_args.holdout_split, script_args.holdout_name, "--holdout_split")
    return train, evaluation, holdout


def load_model_and_tokenizer(model_args, training_args):
    """The model as TRL's scripts build it: revision, attention, dtype and `trust_remote_code`, updated by
    `model_init_kwargs`, plus 4-/8-bit quantisation from the model arguments."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from .assets import check_model_path, resolve_model

    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required (`smollm2-135m-instruct` is the embedded default).")
    path = resolve_model(model_args.model_name_or_path)
    check_model_path(path, "--model_name_or_path")
    model_args.dtype = resolve_dtype(model_args, training_args)
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        trust_remote_code=training_args.trust_remote_code,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    # The model is built here, so the trainer must not be asked to build it again from these.
    training_args.model_init_kwargs = None
    if (model_args.load_in_4bit or model_args.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
        raise ImportError(f"`{flag}` quantises the base model with bitsandbytes, which is not installed: "
                          "pip install 'trl_ica[qlora]'.")  # fmt: skip
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():  # each process loads its 4-bit copy on its own GPU
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train(task: str, script_args, training_args, model_args, dataset_args=None):
    """Load the model, tokenizer and data the way TRL's scripts do, train with ICA weights and save."""
    from trl import DatasetMixtureConfig, get_peft_config

    _, trainer_cls = _classes(task)
    dataset_args = dataset_args or DatasetMixtureConfig()
    train_dataset, eval_dataset, holdout = load_training_data(script_args, training_args, dataset_args)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        holdout_dataset=holdout,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Model saved to {training_args.output_dir}; ICA scores in {training_args.output_dir}/ica."
    )
    return trainer


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TASKS:
        raise SystemExit(f"usage: trl-ica {{{','.join(TASKS)}}} [--config recipe.yaml] [options]; got {argv[:1]}")
    task, rest = argv[0], argv[1:]
    script_args, training_args, model_args, dataset_args = make_parser(task).parse_args_and_config(args=rest)
    return train(task, script_args, training_args, model_args, dataset_args)


if __name__ == "__main__":
    main()
