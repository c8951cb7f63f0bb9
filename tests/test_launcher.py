"""`trl-ica sft|dpo|simpo` behave as `trl sft|dpo`: an accelerate launcher whose unknown flags and YAML keys go to
`accelerate launch`, every TRL script option honoured or refused by name, and the trainer ended as TRL ends it."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from datasets import Dataset
from testing_utils import write_recipe_data

from trl_ica.cli import main as cli
from trl_ica.cli.launch import main as script


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model


def recipe(folder, model_dir, name="recipe.yaml", **extra):
    """A small SFT recipe YAML over the recipe data, with `extra` keys."""
    write_recipe_data(folder, preference=False)
    settings = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(folder / "train.jsonl"),
        "holdout_name": str(folder / "holdout.jsonl"),
        "output_dir": str(folder / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "max_length": 256,
        "bf16": False,
        "use_cpu": True,
        "report_to": "none",
        "use_peft": True,
        "lora_target_modules": "all-linear",
        "ica_num_demos": 1,
        "save_strategy": "no",
        **extra,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_trl_ica_sft_launches_processes_from_the_yaml_and_trls_named_config(tmp_path, model_dir):
    """`num_processes: 2` in the recipe and `--accelerate_config multi_gpu` (TRL's own) start two processes on the
    CPU, as `trl sft` would: each step weights the global batch of 2 processes x 2 rows."""
    config = recipe(tmp_path, model_dir, num_processes=2)
    command = [
        os.path.join(os.path.dirname(sys.executable), "trl-ica"),
        "sft",
        "--config",
        config,
        "--accelerate_config",
        "multi_gpu",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "ica" / "weights.jsonl")]
    assert [sum(r["step"] == s for r in records) for s in (0, 1)] == [4, 4]
    assert os.path.isfile(tmp_path / "run" / "adapter_model.safetensors")


def test_unknown_flags_and_yaml_keys_are_refused_by_name(tmp_path, model_dir):
    config = recipe(tmp_path, model_dir)
    with pytest.raises(ValueError, match=r"Unknown command-line flags \['--max_stepz'\]"):
        cli(["sft", "--config", config, "--max_stepz", "3"])
    bad = recipe(tmp_path, model_dir, "bad.yaml", num_procesess=2)
    with pytest.raises(ValueError, match=r"Unknown keys of the `--config` YAML \['num_procesess'\]"):
        cli(["sft", "--config", bad])
    with pytest.raises(ValueError, match=r"Unknown keys in the `--config` YAML: \['num_procesess'\]"):
        script(["sft", "--config", bad])
    with pytest.raises(ValueError, match=r"`--accelerate_config`='zero9' is neither a file nor one of TRL's configs"):
        cli(["sft", "--config", config, "--accelerate_config", "zero9"])
    with pytest.raises(ValueError, match=r"a `datasets` mixture in the YAML is loaded whole"):
        cli(
            [
                "sft",
                "--config",
                recipe(tmp_path, model_dir, "mix.yaml", datasets=[{"path": "json"}]),
                "--dataset_streaming",
                "true",
            ]
        )


def test_script_streams_the_dataset_with_online_scoring(tmp_path, model_dir):
    """`--dataset_streaming` loads the training file as a stream, which trains weighted at the default settings, each
    row scored as it arrives; R > 1 scorings of the whole set are refused, by the trainer, with the reason."""
    from datasets import IterableDataset

    config = recipe(tmp_path, model_dir)
    with pytest.raises(ValueError, match="rescores every row that many times"):
        script(["sft", "--config", config, "--dataset_streaming", "true", "--ica_refresh", "2"])
    trainer = script(["sft", "--config", config, "--dataset_streaming", "true"])
    assert isinstance(trainer.train_dataset, IterableDataset)
    weights = [json.loads(line) for line in open(tmp_path / "run" / "ica" / "weights.jsonl")]
    assert [w["step"] for w in weights] == [0, 0, 1, 1] and [w["ica_index"] for w in weights] == [0, 1, 2, 3]


def test_script_scores_with_a_scoring_model_of_its_own(tmp_path, model_dir, tokenizer):
    """`--ica_scoring_model` scores with another model (here one of another seed), whose name the run records."""
    from testing_utils import tiny_llama

    scorer = tmp_path / "scorer"
    tiny_llama(seed=5, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(scorer)
    tokenizer.save_pretrained(scorer)
    trainer = script(["sft", "--config", recipe(tmp_path, model_dir), "--ica_scoring_model", str(scorer)])
    assert trainer.ica.scorer is None and trainer.ica.scorer_name == str(scorer)  # scored once, then freed
    scored = [json.loads(line) for line in open(tmp_path / "run" / "ica" / "refresh-0.jsonl")]
    assert len(scored) == 6 and {r["scoring_model"] for r in scored} == {str(scorer)}


def test_script_honours_trls_options_and_ends_the_trainer(tmp_path, model_dir, monkeypatch, caplog):
    """A mixture beside `--dataset_name` is used with a warning, `--ignore_bias_buffers` reaches the model, an
    accelerate key in the YAML is named under a plain launch, and the trainer is ended after saving."""
    from transformers import Trainer

    ended = []
    monkeypatch.setattr(Trainer, "end", lambda self: ended.append(self.args.output_dir), raising=False)
    write_recipe_data(tmp_path, preference=False)
    mixture = tmp_path / "mixture.jsonl"
    Dataset.from_list(list(Dataset.from_json(str(tmp_path / "train.jsonl")))[:4]).to_json(mixture)
    config = recipe(tmp_path, model_dir, num_processes=1, datasets=[{"path": "json", "data_files": str(mixture)}])
    with caplog.at_level("WARNING"):
        trainer = script(["sft", "--config", config, "--ignore_bias_buffers", "true"])
    assert len(trainer.train_dataset) == 4  # the mixture, not the six rows of `dataset_name`
    assert "`datasets` mixture is used and `dataset_name`" in caplog.text
    assert "['num_processes'] are `accelerate launch` options" in caplog.text
    assert hasattr(trainer.model, "_ddp_params_and_buffers_to_ignore")
    assert ended == [str(tmp_path / "run")]
