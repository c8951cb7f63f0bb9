"""Naive reference implementations the fused code is tested against."""

import torch

# Data Whisperer the authors' way: the benchmark of its speed-up runs it too, so it lives there
from benchmarks.common.reference import naive_whisperer  # noqa: F401
from trl_ica.scoring.planner import LogProbRequest


@torch.no_grad()
def naive_token_log_probs(model, request: LogProbRequest) -> list[float]:
    """log p(token | everything before it) of each response token: one full forward of the whole sequence at
    batch 1, full logits, the softmax in float64."""
    ids = list(request.prefix) + list(request.context) + list(request.response)
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    start = len(request.prefix) + len(request.context)
    return [logp[t - 1, ids[t]].item() for t in range(start, len(ids))]


def naive_log_prob(model, request: LogProbRequest) -> float:
    """log p(response | prefix + context), summed over the response tokens ([`naive_token_log_probs`])."""
    return sum(naive_token_log_probs(model, request))
