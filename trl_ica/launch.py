"""`trl-ica sft|dpo|simpo`: TRL-style training scripts with ICA weighting, for `accelerate launch`.

They parse like TRL's own scripts (`TrlParser`): script, training (the ICA config) and model arguments, from the
command line and/or `--config recipe.yaml`, command-line flags overriding the YAML. Datasets are Hub names or local
json/jsonl/parquet files; the holdout is given the same way with `--holdout_name`.

    accelerate launch -m trl_ica.launch sft --config recipes/sft_lora.yaml
    trl-ica sft --config recipes/sft_lora.yaml --max_steps 2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

TASKS = ("sft", "dpo", "simpo")


@dataclass
class ICAScriptArguments:
    """Data arguments of the ICA scripts.

    Args:
        dataset_name (`str`): training data: a Hub dataset name or a local .json/.jsonl/.parquet file.
        dataset_train_split (`str`): its split.
        holdout_name (`str`): the clean holdout set, same forms.
        holdout_split (`str`): its split.
        dataset_config (`str`, *optional*): Hub dataset configuration.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset or local json/jsonl/parquet."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the training data."})
    holdout_name: str | None = field(default=None, metadata={"help": "Holdout: Hub dataset or local file."})
    holdout_split: str = field(default="train", metadata={"help": "Split of the holdout."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})


def _classes(task: str):
    if task == "sft":
        from .sft_config import ICASFTConfig
        from .sft_trainer import ICASFTTrainer

        return ICASFTConfig, ICASFTTrainer
    if task == "dpo":
        from .dpo_config import ICADPOConfig
        from .dpo_trainer import ICADPOTrainer

        return ICADPOConfig, ICADPOTrainer
    from .cpo_config import ICASimPOConfig
    from .cpo_trainer import ICACPOTrainer

    return ICASimPOConfig, ICACPOTrainer


def make_parser(task: str):
    from trl import ModelConfig, TrlParser

    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
    config_cls, _ = _classes(task)
    return TrlParser((ICAScriptArguments, config_cls, ModelConfig), prog=f"trl-ica {task}")


def train(task: str, script_args: ICAScriptArguments, training_args, model_args):
    """Load the model, tokenizer and data the way TRL's scripts do, train with ICA weights and save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .assets import resolve_model
    from .data_io import load_rows

    _, trainer_cls = _classes(task)
    if script_args.dataset_name is None:
        raise ValueError("`--dataset_name` is required: a Hub dataset name or a local json/jsonl/parquet file.")
    if script_args.holdout_name is None:
        raise ValueError("`--holdout_name` is required: the clean holdout set that ICA conditions on.")
    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` is required (`smollm2-135m-instruct` is the embedded default).")
    path = resolve_model(model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation, dtype=dtype)
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():  # each process loads its 4-bit copy on its own GPU
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataset = load_rows(script_args.dataset_name, script_args.dataset_train_split, "--dataset_name")
    holdout = load_rows(script_args.holdout_name, script_args.holdout_split, "--holdout_name")
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
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
    script_args, training_args, model_args = make_parser(task).parse_args_and_config(args=rest)
    return train(task, script_args, training_args, model_args)


if __name__ == "__main__":
    main()
