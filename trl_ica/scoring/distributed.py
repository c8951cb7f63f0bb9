"""Scoring under `accelerate launch`: which processes take part, and keeping their forward passes in step.

With several processes every rank runs the same scoring call. `"shard"` splits the requests between the ranks
([`~accelerate.PartialState.split_between_processes`]) and gathers the results on every rank
([`~accelerate.utils.gather_object`]); `"lockstep"` lets each rank score its own requests (its own training batch).
Both keep the ranks' model calls in step (see [`ForwardLockstep`]), which sharded models (DeepSpeed ZeRO-3) need.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from .models import execution_device

DISTRIBUTED_MODES = ("shard", "lockstep", "local")


def num_processes() -> int:
    """Processes in the running `torch.distributed` group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_mode(distributed: str | None) -> str:
    """`distributed` checked, with `None` meaning `"shard"` under a multi-process launch and `"local"` otherwise.

    A mode other than `"local"` with a single process is `"local"`: there is nobody to keep in step with.
    """
    if distributed is not None and distributed not in DISTRIBUTED_MODES:
        raise ValueError(f"`distributed` must be None or one of {list(DISTRIBUTED_MODES)}, got {distributed!r}.")
    if num_processes() == 1:
        return "local"
    return "shard" if distributed is None else distributed


#: What a process reports at a lockstep step about its last batch: nothing; an out-of-memory error it retries with a
#: smaller batch; one it cannot retry (it stops, and so must every process).
NO_FAILURE, RETRY, STOP = 0, 1, 2


class StepAgreement(NamedTuple):
    """What the processes agreed on before a step: the LM-head calls each makes (-1 once none has work left), the
    worst failure any reported ([`NO_FAILURE`], [`RETRY`], [`STOP`]) and the smallest scoring budget of all."""

    head_calls: int
    failure: int
    budget: int


class ForwardLockstep:
    """Keeps the model calls of every process in the same order, so sharded parameters gather without deadlock.

    Under DeepSpeed ZeRO-3 each module call gathers that module's parameters from every rank: ranks must make the
    same calls in the same order, even when they score different numbers of sequences and tokens. Scoring proceeds in
    steps of one backbone forward followed by some LM-head calls. Before each step the ranks agree (one `all_reduce`
    of four integers) on whether anyone still has work, on the most head calls anyone needs, and on whether any ran
    out of memory in its last batch (and the smallest token budget, which every rank then takes); a rank with less to
    do pads with one-token forwards and one-row head calls.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def step(self, has_work: bool, head_calls: int, failure: int = NO_FAILURE, budget: int = 0) -> StepAgreement:
        """Agree with every rank before a step ([`StepAgreement`]); every rank must call it."""
        flags = torch.tensor([int(has_work), head_calls, failure, -budget], dtype=torch.long, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        work, calls, worst, smallest = (int(x) for x in flags)
        return StepAgreement(calls if work else -1, worst, -smallest)


@contextlib.contextmanager
def zero3_gathered(model: torch.nn.Module):
    """Gather, for the duration, the parameters DeepSpeed ZeRO-3 has partitioned (`zero3_init_flag`) and no engine
    gathers yet: the trainer's constructor runs the model (kNN embeddings) before `accelerator.prepare` creates the
    engine whose hooks would. Each process then holds the whole model for the duration. A no-op without ZeRO-3."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id") and getattr(p, "ds_numel", 0) != p.numel()]
    if not partitioned:
        yield
        return
    import deepspeed  # present: only DeepSpeed partitions parameters this way

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextlib.contextmanager
def unsharded_ancestors(model: torch.nn.Module, *called: torch.nn.Module):
    """Gather, for the duration, the FSDP2 parameter groups of `model` that hold `called` modules' ancestors.

    Scoring calls the backbone and the LM head directly, skipping the forward of the modules around them. Under FSDP2
    (`fully_shard`) the parameters those outer modules own (embeddings, final norm, LM head) are gathered by their
    forward hooks, so they are gathered here instead; modules sharded on their own (decoder layers) still gather in
    their own forward. Every process must enter together (the gather is collective). A no-op without FSDP2.

    FSDP2 makes the first sharded module to run forward the root of its group: a decoder layer called first would
    become a root of its own, and the training forward of the real root would then fail ("FSDP state has already
    been lazily initialized"). So the outermost sharded module runs a one-token forward first (under `no_grad`),
    which makes it the root, as training will.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()  # noqa: N806
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    targets = {id(m) for m in called}
    outer = [m for m in sharded if id(m) not in targets and targets & {id(sub) for sub in m.modules()}]
    if outer:  # the outermost sharded module around the backbone (modules() walks from the outside in): a model
        device = execution_device(model)
        with torch.no_grad():
            outer[0](input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    for module in outer:
        module.unshard()
    try:
        yield
    finally:
        for module in reversed(outer):
            module.reshard()
