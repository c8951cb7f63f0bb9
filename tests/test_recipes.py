"""Every recipe trains for two steps on a tiny model on the CPU, through the same entry point as `trl-ica sft|dpo|
simpo` and `accelerate launch -m trl_ica.launch`, so no recipe rots."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_llama
from datasets import Dataset

from trl_ica.launch import main

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml")))


def _data(folder, preference):
    rows = []
    for i in range(8):
        prompt = [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]
        good = [{"role": "assistant", "content": f"It is {2 * i + 1}."}]
        bad = [{"role": "assistant", "content": f"It is {i}."}]
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad} if preference else {"prompt": prompt,
                    "completion": good})  # fmt: skip
    Dataset.from_list(rows[:6]).to_json(folder / "train.jsonl")
    Dataset.from_list(rows[6:] * 2).to_json(folder / "holdout.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import tiny_tokenizer

    folder = tmp_path_factory.mktemp("model")
    tokenizer = tiny_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_there_is_a_lora_qlora_and_full_recipe_for_each_trainer_and_it_runs_as_shipped():
    from trl_ica.assets import DEFAULT_MODEL

    names = {os.path.basename(r) for r in RECIPES}
    assert names == {f"{t}_{k}.yaml" for t in ("sft", "dpo", "simpo") for k in ("lora", "qlora", "full")}
    for recipe in RECIPES:  # the embedded model and the files `trl-ica data --output data/gsm8k` writes
        config = yaml.safe_load(open(recipe))
        pairs = "_pairs" if not os.path.basename(recipe).startswith("sft") else ""
        assert config["model_name_or_path"] == DEFAULT_MODEL
        assert config["dataset_name"] == f"data/gsm8k/train{pairs}.jsonl"
        assert config["holdout_name"] == f"data/gsm8k/holdout{pairs}.jsonl"


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_trains_two_steps(recipe, model_dir, tmp_path):
    task = os.path.basename(recipe).split("_")[0]
    _data(tmp_path, preference=task != "sft")
    out = tmp_path / "run"
    trainer = main(
        [
            task, "--config", recipe,
            "--model_name_or_path", str(model_dir),
            "--dataset_name", str(tmp_path / "train.jsonl"),
            "--holdout_name", str(tmp_path / "holdout.jsonl"),
            "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_length", "256", "--save_strategy", "no", "--bf16", "false",
        ]
    )  # fmt: skip
    config = yaml.safe_load(open(recipe))
    assert trainer.state.global_step == 2
    # The YAML's own settings reached the trainer; command-line flags overrode it
    assert trainer.args.learning_rate == config["learning_rate"] and trainer.args.max_length == 256
    assert trainer.args.ica_num_demos == config["ica_num_demos"]
    if task != "sft":
        assert trainer.args.beta == config["beta"]
    if task == "simpo":
        assert trainer.args.loss_type == "simpo" and trainer.args.simpo_gamma == config["simpo_gamma"]
    scored = [json.loads(line) for line in open(out / "ica" / "refresh-0.jsonl")]
    assert len(scored) == 6 and all(r["score"] == r["score"] for r in scored)  # every row scored, no NaN
    peft = config.get("use_peft", False)
    assert os.path.isfile(out / ("adapter_config.json" if peft else "model.safetensors"))
    if config.get("load_in_4bit"):
        base = trainer.model.get_base_model()
        assert getattr(base, "is_loaded_in_4bit", False)


def test_cli_writes_the_recipe_data_and_dispatches_training(tmp_path, model_dir):
    from trl_ica.cli import main as cli

    cli(["data", "--output", str(tmp_path / "data"), "--n-train", "6", "--n-holdout", "4", "--n-test", "2"])
    sizes = {name: sum(1 for _ in open(tmp_path / "data" / f"{name}.jsonl")) for name in ("train", "holdout_pairs")}
    assert sizes == {"train": 6, "holdout_pairs": 4}
    # The installed console script, as a user runs it: exit 0 after training, nothing else printed by the exit
    command = os.path.join(os.path.dirname(sys.executable), "trl-ica")
    done = subprocess.run(
        [
            command, "sft", "--model_name_or_path", str(model_dir),
            "--dataset_name", str(tmp_path / "data" / "train.jsonl"),
            "--holdout_name", str(tmp_path / "data" / "holdout.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--max_length", "1024",
            "--ica_num_demos", "1", "--use_peft", "--report_to", "none", "--bf16", "false",
        ],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "object at 0x" not in done.stdout + done.stderr
    refresh = [json.loads(line) for line in open(tmp_path / "run" / "ica" / "refresh-0.jsonl")]
    assert len(refresh) == 6 and all(len(r["demo_indices"]) == 1 for r in refresh)  # --ica_num_demos reached it
    assert os.path.isfile(tmp_path / "run" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="--holdout_name"):
        cli(
            [
                "dpo",
                "--model_name_or_path",
                str(model_dir),
                "--dataset_name",
                "x.jsonl",
                "--output_dir",
                "o",
                "--bf16",
                "0",
            ]
        )
