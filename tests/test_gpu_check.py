"""`scripts/gpu_check.py` is run on a GPU by hand; here its `--smoke` mode (tiny shapes on the CPU) keeps the script
itself working: every section it runs ends without an error and reports its figures."""

import json
import os
import subprocess
import sys


def test_gpu_check_smoke_runs_and_reports(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.py")
    output = tmp_path / "report.json"
    sections = ["precision", "memory_8b", "planner", "qlora", "online_memory"]  # flex attention compiles for 40 s
    done = subprocess.run(
        [sys.executable, script, "--smoke", "--output", str(output), "--sections", *sections],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(output.read_text())
    assert sorted(report["sections"]) == sorted(sections)
    precision = report["sections"]["precision"]
    assert precision["bf16_weights"]["dtypes"] == precision["bf16_autocast"]["dtypes"] == ["torch.bfloat16"]
    assert precision["float32"]["dtypes"] == ["torch.float32"]
    assert report["sections"]["qlora"]["largest_gap"] < 1e-3
    planner = report["sections"]["planner"]["1b"]
    assert planner["auto_chose"] in ("tree", "flat", "none") and set(planner["costs"]) == {"tree", "flat", "none"}
