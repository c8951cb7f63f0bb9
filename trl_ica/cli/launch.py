"""`trl-ica sft|dpo|simpo`: TRL-style training scripts with ICA weighting, and their launcher.

The scripts parse like TRL's own (`TrlParser`): script, training (the ICA config), model and dataset-mixture
arguments, from the command line and/or `--config recipe.yaml`, command-line flags overriding the YAML. Datasets are
Hub names or local json/jsonl/parquet files; the holdout is given the same way with `--holdout_name`.

`trl-ica sft ...` is an accelerate launcher as `trl sft` is: flags and YAML keys that no script dataclass takes
(`--num_processes`, `--accelerate_config zero3` or a file, `num_processes: 8` in the YAML) go to `accelerate launch`,
which runs `python -m trl_ica.launch sft ...` in each process; the script itself is [`main`].

    trl-ica sft --config recipes/sft_lora.yaml --max_steps 2
    trl-ica sft --config recipes/sft_full.yaml --accelerate_config zero3 --num_processes 8
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m trl_ica.launch sft \\
        --config recipes/sft_lora.yaml
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field

TASKS = ("sft", "dpo", "simpo")
#: Set by `trl-ica <task>` for the processes it launches: the YAML's accelerate keys were given to accelerate.
LAUNCHED = "TRL_ICA_LAUNCHED"

logger = logging.getLogger(__name__)


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
    return TrlParser((_script_arguments(), config_cls, _model_config(), DatasetMixtureConfig), prog=f"trl-ica {task}")


def load_training_data(script_args, training_args, dataset_args):
    """`(train, eval or None, holdout)`, loaded as TRL's scripts load theirs: a mixture (`datasets:` in the YAML) or
    `dataset_name` with `dataset_config`, then `dataset_train_split` (and `dataset_test_split` when evaluating)."""
    from trl import get_dataset

    from ..data_io import load_splits, pick_split

    check_script_args(script_args, dataset_args)
    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning(
                "Both `datasets` and `dataset_name` are given: the `datasets` mixture is used and `dataset_name` "
                "(%r) is ignored, as in TRL's scripts.",
                script_args.dataset_name,
            )
        splits, source = get_dataset(dataset_args), "the `datasets` mixture"
    else:
        source = script_args.dataset_name
        splits = load_splits(source, "--dataset_name", script_args.dataset_config, script_args.dataset_streaming)
    train = pick_split(splits, script_args.dataset_train_split, source, "--dataset_train_split")
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = pick_split(splits, script_args.dataset_test_split, source, "--dataset_test_split")
    holdout_splits = load_splits(script_args.holdout_name, "--holdout_name", script_args.holdout_config)
    holdout = pick_split(holdout_splits, script_args.holdout_split, script_args.holdout_name, "--holdout_split")
    return train, evaluation, holdout


def check_script_args(script_args, dataset_args) -> None:
    """What the scripts need before anything loads: a holdout, training data, and no option this package cannot honour
    (each refused by name, with the reason)."""
    if script_args.holdout_name is None:
        raise ValueError("`--holdout_name` is required: the clean holdout set that ICA conditions on.")
    if not dataset_args.datasets and not script_args.dataset_name:
        raise ValueError(
            "The training data is required: `--dataset_name` (a Hub dataset, a local folder or a .json/.jsonl/"
            ".parquet file) or a `datasets` mixture in the YAML."
        )
    if script_args.dataset_streaming and dataset_args.datasets:
        raise ValueError(
            "`--dataset_streaming` streams `--dataset_name`; a `datasets` mixture in the YAML is loaded whole. Drop "
            "one of them."
        )


def load_model_and_tokenizer(model_args, training_args):
    """The model as TRL's scripts build it: revision, attention, dtype and `trust_remote_code`, updated by
    `model_init_kwargs`, plus 4-/8-bit quantisation from the model arguments."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from ..embedded import check_model_path, resolve_model

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
        raise ImportError(
            f"`{flag}` quantises the base model with bitsandbytes, which is not installed: "
            "pip install 'trl_ica[qlora]'."
        )
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
    if script_args.ignore_bias_buffers:  # as TRL's scripts: DDP skips the boolean buffers (attention masks)
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Model saved to {training_args.output_dir}; ICA scores in {training_args.output_dir}/ica."
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub as {trainer.hub_model_id}.")
    # Only the main process writes; the others would reach `end()` and exit while gloo's worker thread may still be
    # releasing the tensors of training's last collectives, which needs the GIL and aborts the process ("terminate
    # called without an active exception") once the interpreter is shutting down. Waiting here, with the GIL
    # released, until the main process has saved gives that thread the time.
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group, as TRL's scripts
        trainer.end()
    return trainer


def _parse(task: str, args: list[str]):
    """`(script, training, model, mixture, yaml_left, flags_left)`: the dataclasses, then the YAML keys and the
    command-line strings no dataclass took (as `--key value` strings), as TRL's launcher parses them."""
    if task not in TASKS:
        raise SystemExit(f"usage: trl-ica {{{','.join(TASKS)}}} [--config recipe.yaml] [options]; got {task!r}")
    return make_parser(task).parse_args_and_config(
        args=args, return_remaining_strings=True, separate_remaining_strings=True
    )


def _launcher_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option for action in launch_command_parser()._actions for option in action.option_strings}


def main(argv=None):
    """The training script, one per process: `python -m trl_ica.launch sft ...` (what `accelerate launch` runs).

    A YAML key that no dataclass takes is either an `accelerate launch` option (applied by `trl-ica <task>`, which
    launched this process; under a plain `accelerate launch` it is not, and a warning says so) or an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit(f"usage: trl-ica {{{','.join(TASKS)}}} [--config recipe.yaml] [options]")
    *parsed, yaml_left, flags_left = _parse(argv[0], argv[1:])
    if flags_left:
        raise ValueError(f"Unknown arguments {flags_left}: not a field of the script, training or model arguments.")
    keys = yaml_left[::2]
    launcher = _launcher_options()
    unknown = [key for key in keys if key not in launcher]
    if unknown:
        raise ValueError(
            f"Unknown keys in the `--config` YAML: {[key[2:] for key in unknown]}; they are neither fields of the "
            "script, training or model arguments nor `accelerate launch` options."
        )
    if keys and os.environ.get(LAUNCHED) != "1":
        logger.warning(
            "The YAML's %s are `accelerate launch` options: `trl-ica %s` passes them to accelerate, a plain "
            "`accelerate launch` does not (its own flags and config file apply).",
            [key[2:] for key in keys],
            argv[0],
        )
    return train(argv[0], *parsed)


def launch_arguments(argv: list[str]) -> list[str]:
    """The `accelerate launch` arguments that `trl-ica sft|dpo|simpo ...` runs, checked: the options no script
    dataclass takes, from the command line and the YAML, first (`--accelerate_config` as `--config_file`), then
    `--module trl_ica.launch` with the script's own arguments."""
    task, args = argv[0], list(argv[1:])
    script_args, _, _, dataset_args, yaml_left, flags_left = _parse(task, args)
    check_script_args(script_args, dataset_args)  # before any process starts
    options = _launcher_options() | {"--accelerate_config"}
    for where, left in (("command-line flags", flags_left), ("keys of the `--config` YAML", yaml_left)):
        unknown = [item for item in left if item.startswith("--") and item.split("=")[0] not in options]
        unknown = [item[2:] for item in unknown] if left is yaml_left else unknown
        if unknown:
            raise ValueError(
                f"Unknown {where} {unknown}: neither fields of the script, training or model arguments nor "
                f"`accelerate launch` options (see `trl-ica {task} --help` and `accelerate launch --help`)."
            )
    launch_args = _resolve_accelerate_config(yaml_left + flags_left)
    return [*launch_args, "--module", "trl_ica.launch", task, *_without(args, flags_left)]


def launch(argv: list[str]) -> None:
    """`trl-ica sft|dpo|simpo ...`, as `trl sft|dpo` run: `accelerate launch` with [`launch_arguments`], which starts
    [`main`] in each process."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args(launch_arguments(argv))
    os.environ[LAUNCHED] = "1"
    try:
        launch_command(parsed)
    except subprocess.CalledProcessError as error:  # the processes printed their own error
        raise SystemExit(error.returncode) from None


def _without(args: list[str], taken: list[str]) -> list[str]:
    """`args` less `taken`, an ordered subsequence of it."""
    out, taken = [], list(taken)
    for item in args:
        if taken and item == taken[0]:
            taken.pop(0)
        else:
            out.append(item)
    return out


def _resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """`--accelerate_config NAME_OR_FILE` as `--config_file PATH`: a file, or one of the configs TRL ships
    (`trl/accelerate_configs/NAME.yaml`: `zero3`, `fsdp2`, `multi_gpu`, ...)."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    at = launch_args.index("--accelerate_config")
    if at + 1 >= len(launch_args):
        raise ValueError("`--accelerate_config` needs a value: one of TRL's config names or a YAML file.")
    name = launch_args[at + 1]
    path = name
    if not os.path.isfile(name):
        from importlib.resources import files

        shipped = files("trl.accelerate_configs")
        names = sorted(p.name[:-5] for p in shipped.iterdir() if p.name.endswith(".yaml"))
        if name not in names:
            raise ValueError(f"`--accelerate_config`={name!r} is neither a file nor one of TRL's configs {names}.")
        path = str(shipped.joinpath(f"{name}.yaml"))
    return ["--config_file", path, *launch_args[:at], *launch_args[at + 2 :]]


if __name__ == "__main__":
    main()
