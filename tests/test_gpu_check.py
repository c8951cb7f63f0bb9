"""`scripts/gpu_check.py` is run on a GPU machine by hand; here its `--smoke` mode (tiny shapes on the CPU) keeps the
script itself working: every section it runs ends without an error, compares what it says it compares, and skips
with a reason what the machine lacks; and it runs where only torch, transformers, accelerate and peft are installed,
as on a bare GPU image."""

import json
import os
import site
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.py")


def smoke(tmp_path, sections, python=(sys.executable,), env=None):
    output = tmp_path / "report.json"
    command = [*python, SCRIPT, "--smoke", "--output", str(output), "--budget", "1800", "--sections", *sections]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    report = json.loads(output.read_text())
    assert list(report["sections"]) == sections
    return report["sections"]


@pytest.mark.multiprocess
def test_gpu_check_smoke_runs_and_reports(tmp_path):
    sections = ["precision", "planner", "qlora", "fsdp2", "zero3", "lora_step"]  # attention: the CPU tests cover it
    report = smoke(tmp_path, sections)
    precision = report["precision"]
    assert precision["bf16_weights"]["dtypes"] == precision["bf16_autocast"]["dtypes"] == ["torch.bfloat16"]
    assert precision["float32"]["dtypes"] == ["torch.float32"]
    for name in ("float32", "bf16_weights", "bf16_autocast"):  # each against the plain forward of its precision
        assert precision[name]["ok"] and precision[name]["regrouping_noise"] > 0
    # bf16 rounds far more than float32: the noise each gap is judged by is the precision's own
    assert precision["bf16_weights"]["regrouping_noise"] > 100 * precision["float32"]["regrouping_noise"]
    planner = report["planner"]["1b_bf16"]
    assert set(planner["requests_per_second"]) == set(planner["costs"]) == {"tree", "flat", "none"}
    assert planner["chosen_with_measured"] in planner["costs"] and planner["measured_overhead_tokens"] > 0
    assert report["planner"]["suggested_ica_scoring_overhead"] >= 1
    for name in ("qlora", "zero3"):
        module = {"qlora": "bitsandbytes", "zero3": "deepspeed"}[name]
        installed = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0
        assert ("skipped" not in report[name]) == installed, report[name]
        assert installed or module in report[name]["skipped"]
    if "skipped" not in report["qlora"]:
        assert report["qlora"]["ok"]
    assert report["fsdp2"]["plain"]["ok"] and "skipped" in report["fsdp2"]["cpu_offload"]
    assert report["lora_step"]["ok"] and report["lora_step"]["losses"][1] < report["lora_step"]["losses"][0]


def bare_site(tmp_path, missing):
    """This environment's site-packages without the `missing` distributions (and without trl_ica's own install): a
    folder of links, for `python -S` with it on `PYTHONPATH`."""
    folder = tmp_path / "site"
    folder.mkdir()
    for packages in site.getsitepackages():
        for name in os.listdir(packages):
            top = name.split("-")[0].split(".")[0].lower()
            if top in missing or name.endswith(".pth") or top.startswith(("__editable__", "_trl_ica", "trl_ica")):
                continue
            if not (folder / name).exists():
                (folder / name).symlink_to(os.path.join(packages, name))
    return folder


@pytest.mark.multiprocess
def test_gpu_check_runs_without_trl_datasets_and_the_optional_packages(tmp_path):
    """As on the GPU image: no trl, datasets, bitsandbytes or deepspeed, and trl_ica not installed (run from the
    checkout). The engine imports and scores; the sections that need a missing package say which."""
    missing = {"trl", "datasets", "bitsandbytes", "deepspeed", "flash_attn"}
    folder = bare_site(tmp_path, missing)
    env = {**os.environ, "PYTHONPATH": str(folder)}
    check = subprocess.run([sys.executable, "-S", "-c", "import trl"], capture_output=True, env=env)
    assert check.returncode != 0  # the simulation really lacks trl
    report = smoke(tmp_path, ["precision", "qlora", "zero3"], python=(sys.executable, "-S"), env=env)
    assert report["precision"]["bf16_weights"]["ok"]
    assert "bitsandbytes" in report["qlora"]["skipped"] and "deepspeed" in report["zero3"]["skipped"]


@pytest.mark.multiprocess
@pytest.mark.multiprocess
def test_sections_past_the_time_budget_are_skipped_with_the_reason(tmp_path):
    output = tmp_path / "report.json"
    command = [sys.executable, SCRIPT, "--smoke", "--budget", "0", "--output", str(output), "--sections", "precision"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--budget 0 s" in json.loads(output.read_text())["sections"]["precision"]["skipped"]


def test_gpu_check_refuses_an_unknown_section():
    command = [sys.executable, SCRIPT, "--smoke", "--sections", "nonsense"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode != 0 and "nonsense" in done.stderr
