"""Run by `tests/test_distributed.py` under `accelerate launch --num_processes 2 --cpu`: out-of-memory errors injected
inside rank 1's scoring forwards, and what each process saw, written to --out (`oom-<rank>.json`).

1. An error inside rank 1's first forward of several rows: rank 1 halves its budget and retries, and rank 0 takes the
   same budget at the next step.
2. An error inside a forward of a single sequence, which no retry mends: both processes stop with the error, instead
   of one waiting for the other.
"""

import argparse
import json
import os

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from trl_ica.scoring.engine import ScoringBudget, score_requests
from trl_ica.scoring.planner import LogProbRequest


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = PartialState(cpu=True).process_index
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    failures = {"rows": 2, "seen": []}

    def out_of_memory(module, args, kwargs):  # inside the backbone's forward, after the processes agreed on the step
        ids = kwargs.get("input_ids")
        if rank == 1 and ids is not None and ids.shape[0] >= failures["rows"] and not failures["seen"]:
            failures["seen"].append(int(ids.shape[0]))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    model.model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    requests = [LogProbRequest((5, 6), (7,) * (1 + j), tuple(range(10, 14 + j))) for j in range(6)]
    budget = ScoringBudget(400)
    retried = score_requests(model, requests, max_batch_tokens=budget, show_progress=False, distributed="lockstep")
    reference = score_requests(model, requests, show_progress=False, distributed="local")
    failures.update(rows=1, seen=[])
    try:
        score_requests(model, requests, batch_size=1, show_progress=False, distributed="lockstep")
        stopped = None
    except torch.OutOfMemoryError as error:
        stopped = str(error)
    with open(os.path.join(args.out, f"oom-{rank}.json"), "w") as f:
        json.dump(
            {
                "budget_after": budget.tokens,
                "retried": retried.sums.tolist(),
                "reference": reference.sums.tolist(),
                "stopped": stopped,
            },
            f,
        )


if __name__ == "__main__":
    main()
