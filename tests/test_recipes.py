"""Every recipe trains for two steps on a tiny model on the CPU, through the same entry point as `trl-ica sft|dpo|
simpo` and `accelerate launch -m trl_ica.launch`, so no recipe rots."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from datasets import Dataset
from testing_utils import chat_row, tiny_llama

from trl_ica import ICASFTConfig
from trl_ica.cli.launch import main

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model that stands in for the recipes' SmolLM2 (with SmolLM2's context size: the recipes' rows with
    three demonstrations run to a few thousand of the tiny tokenizer's tokens)."""
    from testing_utils import tiny_tokenizer

    folder = tmp_path_factory.mktemp("model")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=8192)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    """A folder laid out as the README's user has it: `recipes/` and what `trl-ica data --output data/gsm8k` writes
    (fewer rows than its default, so that every recipe's scoring stays short)."""
    import shutil

    from trl_ica.cli import main as cli

    folder = tmp_path_factory.mktemp("user")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "recipes"), folder / "recipes")
    cli(["data", "--output", str(folder / "data" / "gsm8k"), "--n-train", "24", "--n-holdout", "8", "--n-test", "2"])
    return folder


def test_there_is_a_lora_qlora_and_full_recipe_for_each_trainer_and_it_runs_as_shipped():
    from trl_ica.embedded import DEFAULT_MODEL

    names = {os.path.basename(r) for r in RECIPES}
    assert names == {f"{t}_{k}.yaml" for t in ("sft", "dpo", "simpo") for k in ("lora", "qlora", "full")}
    for recipe in RECIPES:  # the embedded model and the files `trl-ica data --output data/gsm8k` writes
        config = yaml.safe_load(open(recipe))
        pairs = "_pairs" if not os.path.basename(recipe).startswith("sft") else ""
        assert config["model_name_or_path"] == DEFAULT_MODEL
        assert config["dataset_name"] == f"data/gsm8k/train{pairs}.jsonl"
        assert config["holdout_name"] == f"data/gsm8k/holdout{pairs}.jsonl"
        assert "bf16" not in config, "precision follows the device unless the user sets it"


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_trains_two_steps_as_shipped(recipe, model_dir, recipe_dir, monkeypatch):
    """Each recipe with its own settings and data paths, on a CPU: only the model and the step count are given."""
    task = os.path.basename(recipe).split("_")[0]
    monkeypatch.chdir(recipe_dir)
    name = os.path.basename(recipe)
    trainer = main([task, "--config", f"recipes/{name}", "--model_name_or_path", str(model_dir), "--max_steps", "2"])
    config = yaml.safe_load(open(recipe))
    assert trainer.state.global_step == 2
    assert trainer.args.bf16 is False  # no bf16 GPU here: fp32, chosen for the user
    # The YAML's own settings reached the trainer
    for key in ("learning_rate", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps"):
        assert getattr(trainer.args, key) == config[key], key
    assert trainer.args.ica_num_demos == config["ica_num_demos"]
    if task != "sft":
        assert trainer.args.beta == config["beta"]
    if task == "simpo":
        assert trainer.args.loss_type == "simpo" and trainer.args.simpo_gamma == config["simpo_gamma"]
    out = recipe_dir / config["output_dir"]
    scored = [json.loads(line) for line in open(out / "ica" / "refresh-0.jsonl")]
    assert len(scored) == 24 and all(r["score"] == r["score"] for r in scored)  # every row scored, no NaN
    peft = config.get("use_peft", False)
    assert os.path.isfile(out / ("adapter_config.json" if peft else "model.safetensors"))
    # The card names the ICA method, cites ICA and the parent method, and lists the run's ICA files
    card = open(out / "README.md").read()
    method, parent = {
        "sft": ("ICA-SFT", None),
        "dpo": ("ICA-DPO", "rafailov2023direct"),
        "simpo": ("ICA-SimPO", "meng2024simpo"),
    }[task]
    assert f"trained with {method}, a method introduced in [Holdout-Loss-Based Data Selection" in card
    assert str(model_dir) not in card  # a local folder is not named as a Hub base model
    assert "2510.14459" in card and "zhang2026holdout" in card
    assert parent is None or parent in card
    assert "`ica/refresh-0.jsonl`" in card and "| `ica_num_demos` | `3` |" in card
    if config.get("load_in_4bit"):
        base = trainer.model.get_base_model()
        assert getattr(base, "is_loaded_in_4bit", False)


@pytest.mark.multiprocess
def test_readme_launch_line_runs_as_written(model_dir, recipe_dir):
    """The README's `accelerate launch` line of the LoRA SFT recipe, in a subprocess, with the tiny model."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    line = next(line.strip() for line in readme.splitlines() if line.endswith("sft --config recipes/sft_lora.yaml"))
    assert line.startswith("accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m trl_ica.launch"), (
        line
    )
    bin_dir = os.path.dirname(sys.executable)
    command = [
        os.path.join(bin_dir, "accelerate"),
        *line.split()[1:],
        "--model_name_or_path",
        str(model_dir),
        "--max_steps",
        "1",
        "--output_dir",
        "runs/readme",
    ]
    done = subprocess.run(
        command,
        cwd=recipe_dir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert os.path.isfile(recipe_dir / "runs" / "readme" / "adapter_model.safetensors")


def test_four_bit_without_bitsandbytes_names_the_extra(model_dir, recipe_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    monkeypatch.chdir(recipe_dir)
    with pytest.raises(ImportError, match=r"`--load_in_4bit` .*pip install 'trl_ica\[qlora\]'"):
        main(["sft", "--config", "recipes/sft_qlora.yaml", "--model_name_or_path", str(model_dir), "--max_steps", "1"])


@pytest.mark.multiprocess
def test_cli_writes_the_recipe_data_and_dispatches_training(tmp_path, model_dir):
    from trl_ica.cli import main as cli

    cli(["data", "--output", str(tmp_path / "data"), "--n-train", "6", "--n-holdout", "4", "--n-test", "2"])
    sizes = {name: sum(1 for _ in open(tmp_path / "data" / f"{name}.jsonl")) for name in ("train", "holdout_pairs")}
    assert sizes == {"train": 6, "holdout_pairs": 4}
    # The installed console script, as a user runs it: exit 0 after training, nothing else printed by the exit
    command = os.path.join(os.path.dirname(sys.executable), "trl-ica")
    done = subprocess.run(
        [
            command,
            "sft",
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(tmp_path / "data" / "train.jsonl"),
            "--holdout_name",
            str(tmp_path / "data" / "holdout.jsonl"),
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "1",
            "--max_length",
            "1024",
            "--ica_num_demos",
            "1",
            "--use_peft",
            "--report_to",
            "none",
            "--bf16",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
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


def test_card_names_the_hub_model_the_embedded_default_came_from(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from trl_ica import embedded
    from trl_ica.embedded import EMBEDDED_BASE
    from trl_ica.trainer.model_card import base_model_name

    monkeypatch.setenv("TRL_ICA_CACHE", str(tmp_path))
    converted = tmp_path / "SmolLM2-135M-Instruct-0123abcd"
    converted.mkdir()
    monkeypatch.setattr(embedded, "default_model_path", lambda: pytest.fail("a model card must not convert a model"))
    assert base_model_name(SimpleNamespace(_name_or_path=str(converted))) == EMBEDDED_BASE
    assert base_model_name(SimpleNamespace(_name_or_path=str(tmp_path / "other"))) == str(tmp_path / "other")
    (tmp_path / "local").mkdir()
    assert base_model_name(SimpleNamespace(_name_or_path=str(tmp_path / "local"))) is None  # a folder, not a Hub id
    assert base_model_name(SimpleNamespace(_name_or_path="Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"


def _sft_rows(n, offset=0):
    return [chat_row(f"What is {i} plus {i + 1}?", f"It is {2 * i + 1}.") for i in range(offset, offset + n)]


def test_script_loads_data_the_way_trl_scripts_do(model_dir, tmp_path):
    """A local folder with train and test splits (evaluated on), a holdout from a mixture-free file, and
    `model_init_kwargs` reaching the model; a split a file does not have is refused by name."""
    folder = tmp_path / "data"
    folder.mkdir()
    Dataset.from_list(_sft_rows(6)).to_json(folder / "train.jsonl")
    Dataset.from_list(_sft_rows(3, 10)).to_json(folder / "test.jsonl")
    Dataset.from_list(_sft_rows(4, 20)).to_json(tmp_path / "holdout.jsonl")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(model_dir),
                "dataset_name": str(folder),
                "holdout_name": str(tmp_path / "holdout.jsonl"),
                "output_dir": str(tmp_path / "run"),
                "max_steps": 1,
                "per_device_train_batch_size": 2,
                "eval_strategy": "steps",
                "eval_steps": 1,
                "report_to": "none",
                "model_init_kwargs": {"dtype": "float64"},
                "ica_num_demos": 1,
            }
        )
    )
    trainer = main(["sft", "--config", str(recipe)])
    assert len(trainer.eval_dataset) == 3 and len(trainer.ica.builder.candidates) == 6
    assert next(trainer.model.parameters()).dtype == torch.float64  # model_init_kwargs applied
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['train'\]"):
        main(["sft", "--config", str(recipe), "--holdout_split", "validation"])


def test_script_takes_a_trl_dataset_mixture(model_dir, tmp_path):
    for name, offset in (("a", 0), ("b", 10)):
        Dataset.from_list(_sft_rows(4, offset)).to_json(tmp_path / f"{name}.jsonl")
    Dataset.from_list(_sft_rows(4, 20)).to_json(tmp_path / "holdout.jsonl")
    mixture = [{"path": "json", "data_files": str(tmp_path / f"{name}.jsonl"), "split": "train"} for name in "ab"]
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(model_dir),
                "datasets": mixture,
                "holdout_name": str(tmp_path / "holdout.jsonl"),
                "output_dir": str(tmp_path / "run"),
                "max_steps": 1,
                "per_device_train_batch_size": 2,
                "report_to": "none",
                "ica_num_demos": 1,
            }
        )
    )
    trainer = main(["sft", "--config", str(recipe)])
    assert len(trainer.ica.builder.candidates) == 8  # both files of the mixture


def test_demo_scores_the_pool_once_and_reports_the_oracle(model_dir, tmp_path, monkeypatch, capsys):
    from trl_ica.cli import demo
    from trl_ica.trainer import controller

    calls = []
    real = controller.ICAController._score_all
    monkeypatch.setattr(controller.ICAController, "_score_all", lambda self, m, b: calls.append(b) or real(self, m, b))
    args = demo.make_parser().parse_args(
        [
            "--model",
            str(model_dir),
            "--output-dir",
            str(tmp_path / "demo"),
            "--n-train",
            "8",
            "--n-holdout",
            "4",
            "--n-test",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--top-layers",
            "1",
        ]
    )
    summary = demo.run(args)
    # the trainer took the demo's scores instead of scoring the pool again; only the holdout's own are computed
    assert len(calls) == 1 and len(calls[0].candidates) == 4
    refresh = [json.loads(line) for line in open(tmp_path / "demo" / "ICA" / "ica" / "refresh-0.jsonl")]
    assert len(refresh) == 8 and {r["source"] for r in refresh} == {"the demo's scoring of the pool"}
    assert {"test_loss_uniform", "test_loss_oracle", "test_loss_ica", "test_loss_before"} <= set(summary)
    # the weighted run used the trainer's defaults, which are the settings the summary reports
    default = ICASFTConfig("o", use_cpu=True)
    assert (summary["settings"]["ica_weight_mode"], summary["settings"]["ica_weighting"]) == (
        default.ica_weight_mode,
        default.ica_weighting,
    )
    assert "oracle" in capsys.readouterr().out
    assert json.load(open(tmp_path / "demo" / "summary.json"))["test_loss_ica"] == summary["test_loss_ica"]


@pytest.mark.parametrize("kind", ["other_task", "shuffled", "mixture"])
def test_label_noise_pool_replaces_what_its_kind_says(kind):
    from trl_ica.cli.scenarios import reasoning_gym_label_noise

    def pool(noise, noise_task="leg_counting,count_bits"):
        train, holdout, test, clean = reasoning_gym_label_noise(
            noise=noise,
            noise_kind=kind,
            noise_task=noise_task if kind == "mixture" else "count_bits",
            n_train=20,
            n_holdout=3,
            n_test=3,
            seed=1,
        )
        return [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in train], clean, holdout, test

    clean_rows, all_clean, holdout, test = pool(0.0)
    rows, clean, _, _ = pool(0.5)
    assert all_clean.all() and clean.sum() == 10 and len(holdout) == len(test) == 3
    for (q0, a0), (q, a), keep in zip(clean_rows, rows, clean):
        if keep:
            assert (q, a) == (q0, a0)
        elif kind == "mixture":  # the whole row comes from another task
            assert q != q0 and not q.startswith("Calculate")
        else:  # the question stays, the answer is another
            assert q == q0 and a != a0
    if kind == "mixture":  # the named tasks take turns
        noisy = [q for (q, _), keep in zip(rows, clean) if not keep]
        assert sum("legs" in q for q in noisy) == sum("1 bits" in q for q in noisy) == 5
    elif kind == "other_task":
        with pytest.raises(ValueError, match="noise_task"):
            reasoning_gym_label_noise(noise_kind=kind, noise_task="leg_counting,count_bits", n_train=4)


def test_recipes_load_the_base_in_the_training_precision_unless_dtype_is_set():
    """TRL's `ModelConfig.dtype` defaults to float32, which would load a LoRA base (and QLoRA's compute dtype) in
    float32 on a bf16 GPU; unset, a PEFT run loads in the mixed-precision dtype and a full fine-tune in float32."""
    from types import SimpleNamespace

    from trl_ica.cli.launch import make_parser, resolve_dtype

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "sft_lora.yaml")
    parsed = make_parser("sft").parse_args_and_config(args=["--config", recipe])
    model_args = parsed[2]
    assert model_args.dtype is None and model_args.use_peft
    lora, full = SimpleNamespace(dtype=None, use_peft=True), SimpleNamespace(dtype=None, use_peft=False)
    assert resolve_dtype(lora, SimpleNamespace(bf16=True, fp16=False)) == "bfloat16"
    assert resolve_dtype(lora, SimpleNamespace(bf16=False, fp16=True)) == "float16"
    assert resolve_dtype(lora, SimpleNamespace(bf16=False, fp16=False)) == "float32"
    assert resolve_dtype(full, SimpleNamespace(bf16=True, fp16=False)) == "float32"
    chosen = SimpleNamespace(dtype="float32", use_peft=True)
    assert resolve_dtype(chosen, SimpleNamespace(bf16=True, fp16=False)) == "float32"
