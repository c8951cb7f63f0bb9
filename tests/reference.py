"""Naive reference implementations the fused code is tested against."""

import torch

from trl_ica.engine import LogProbRequest


@torch.no_grad()
def naive_log_prob(model, request: LogProbRequest) -> float:
    """log p(response | prefix + context): one full forward of the whole sequence at batch 1, full logits."""
    ids = list(request.prefix) + list(request.context) + list(request.response)
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    start = len(request.prefix) + len(request.context)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
