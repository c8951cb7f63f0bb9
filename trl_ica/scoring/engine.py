"""Fused log-probability scoring with shared prefixes.

A [`LogProbRequest`] asks for `log p(response | prefix, context)`. Prefixes that start with the same tokens (the chat
template's opening, the same first demonstration, the same first two) share the KV cache of that common part: the
shared parts form a prefix tree ([`plan_prefixes`]), each piece of which runs once, depth-first, extending its
parent's cache; every request is then scored against the deepest shared piece of its prefix, its own remaining
tokens run in batches with those of the other requests at that piece, each row reading the one copy of the piece's
cache ([`seams.read_only_prefix_cache`]). Whether to share that finely, only whole prefixes, or not at all is chosen
by a cost model that charges each forward a fixed overhead ([`choose_sharing`]). Batches stay under a token budget
that counts the prefix each row attends to ([`ScoringBudget`]); the LM head is applied only at response positions,
in chunks of bounded size. Caches keep every position of every layer, so sliding-window layers are exact; models
with layers that cannot share a cache score whole sequences. Results come back in the caller's order and equal a
plain forward of each full sequence up to floating-point rounding.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .. import seams
from .distributed import RETRY, STOP, ForwardLockstep, StepAgreement, resolve_mode, unsharded_ancestors
from .models import (
    autocast_to,
    backbone_and_head,
    eval_mode,
    execution_device,
    head_chunk,
    head_log_probs,
    head_rows,
    heavy_forward,
    is_oom,
    pad_id,
    padded_batch,
    sharded_forward,
)
from .planner import (
    SHARINGS,
    LogProbRequest,
    batch_end,
    choose_sharing,
    default_overhead,
    plan_prefixes,
)

logger = logging.getLogger(__name__)


@dataclass
class LogProbs:
    """Summed response log-probabilities (`float64`, shape `(N,)`) and response token counts (`int64`, `(N,)`);
    with `per_token=True`, also each response's token log-probabilities (`tokens`: N `float32` arrays, `counts[i]`
    long, in response order), whose float64 sums are `sums`."""

    sums: np.ndarray
    counts: np.ndarray
    tokens: list | None = None


class PrefixState(NamedTuple):
    """A prefix run once: per-layer `(keys, values)` at batch 1 with every position (sliding-window layers too), the
    hidden state `(1, H)` that predicts the next token, and the prefix's length."""

    layers: list
    hidden: torch.Tensor
    length: int


class PeerOutOfMemoryError(torch.OutOfMemoryError):
    """Raised on every other process when one ran out of memory scoring and could not retry: all stop together."""


class _ForwardRunner:
    def __init__(self, model, device, lockstep: ForwardLockstep | None = None, compute_dtype=None, budget=None):
        self.lm, self.backbone, self.head = backbone_and_head(model)
        self.device = device
        self.pad_id = pad_id(self.lm)
        self.lockstep = lockstep
        self.budget = budget if budget is not None else ScoringBudget()
        self.failure = 0  # reported at the next lockstep step: RETRY after an out-of-memory error this rank retries
        # a rank can leave a forward for an out-of-memory error and still meet the others at the next step only
        # when the forward itself makes no collective calls
        self.can_fail_alone = lockstep is None or not sharded_forward(model)
        config = self.lm.config.get_text_config() if hasattr(self.lm.config, "get_text_config") else self.lm.config
        self.hidden_size = config.hidden_size
        self.head_chunk = head_chunk(head_rows(self.head))
        self.compute_dtype = compute_dtype
        self.cache_argument = seams.cache_argument(self.backbone)
        kinds = seams.attention_layer_types(self.lm.config)
        self.unshareable = sorted(set(kinds) - set(seams.SHAREABLE_LAYER_TYPES))

    @property
    def shares_prefixes(self) -> bool:
        """Whether a prefix's KV cache can serve its continuations exactly: every layer is full or sliding-window
        attention. Other layers (recurrent or linear attention, chunked attention, layers reading another layer's
        cache) are scored with each request's whole sequence."""
        return not self.unshareable

    def compute(self):
        """Autocast to the training's compute dtype when it differs from the weights' (accelerate's mixed precision
        runs `model.forward` so, and the engine calls the backbone and head directly); otherwise nothing."""
        return autocast_to(self.device, self.compute_dtype, self.head.weight.dtype)

    def _in_step(self, head_calls: int) -> int:
        """Before a backbone forward: the LM-head calls every process makes after it (this one's own without sync)."""
        if self.lockstep is None:
            return head_calls
        return self._agreed(self.lockstep.step(True, head_calls, self.failure, self.budget.tokens or 0)).head_calls

    def _agreed(self, agreement: StepAgreement) -> StepAgreement:
        """Act on what a step's agreement says of the others: after any process's out-of-memory error every process
        takes the smallest budget of all; after one no process can retry, every process stops."""
        if agreement.failure == STOP:
            raise PeerOutOfMemoryError(
                "Another process ran out of memory scoring and cannot retry, so every process stops. Lower the "
                f"scoring token budget (`ica_scoring_max_tokens`, `--scoring-max-tokens`), currently "
                f"{self.budget.tokens}, or give fewer or shorter demonstrations."
            )
        if agreement.failure == RETRY:
            if agreement.budget < self.budget.tokens:
                logger.warning(
                    "A process ran out of memory scoring; the scoring budget is now %d positions on every process.",
                    agreement.budget,
                )
            self.budget.tokens, self.budget.backed_off = min(self.budget.tokens, agreement.budget), True
        self.failure = 0
        return agreement

    def stop_together(self) -> None:
        """Before raising an out-of-memory error no retry can mend: tell the other processes at their next step,
        so that they stop too instead of waiting (possible only when forwards make no collective calls)."""
        if self.lockstep is not None and self.can_fail_alone:
            self.lockstep.step(False, 0, STOP, self.budget.tokens or 0)

    def _pad_head_calls(self, done: int, wanted: int) -> None:
        for _ in range(wanted - done):  # match processes that score more tokens in this step
            self.head(torch.zeros(1, self.hidden_size, dtype=self.head.weight.dtype, device=self.device))

    def finish(self) -> None:
        """With lockstep, run one-token dummy steps until every process has run out of work."""
        if self.lockstep is None:
            return
        while True:
            head_calls = self._agreed(self.lockstep.step(False, 0, self.failure, self.budget.tokens or 0)).head_calls
            if head_calls < 0:
                break
            self.backbone(input_ids=torch.tensor([[self.pad_id]], device=self.device), use_cache=False)
            self._pad_head_calls(0, head_calls)

    def prefix_state(self, segment: tuple[int, ...], parent: PrefixState | None = None) -> PrefixState:
        """Run a prefix piece once at batch 1, after `parent` (the piece before it) if given."""
        head_calls = self._in_step(0)
        start = parent.length if parent is not None else 0
        cache = seams.full_cache(parent.layers if parent is not None else None)  # the parent's tensors stay as is
        try:
            out = self.backbone(
                input_ids=torch.tensor([segment], device=self.device),
                position_ids=torch.arange(start, start + len(segment), device=self.device)[None],
                use_cache=True,
                **{self.cache_argument: cache},
            )
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if is_oom(error):  # one prefix at batch 1: nothing smaller to retry
                self.stop_together()
            raise
        self._pad_head_calls(0, head_calls)
        layers = seams.cache_key_values(cache)
        length = start + len(segment)
        if not layers or any(k.shape[-2] != length or v.shape[-2] != length for k, v in layers):
            raise seams.SeamError(
                "a `DynamicCache` without a config keeping every position of every layer (transformers.cache_utils)",
                f"after a {length}-token prefix the layers hold {sorted({k.shape[-2] for k, _ in layers})} positions",
            )
        return PrefixState(layers, out.last_hidden_state[:, -1], length)

    def score_batch(
        self, requests: Sequence[LogProbRequest], rows: list[int], state: PrefixState | None, per_token: bool = False
    ) -> tuple[list, list | None]:
        """Score `rows` of `requests` against a shared prefix state (or none): one sum per row, and (`per_token`)
        one array of token log-probabilities per row, else None."""
        conts = [requests[i].context + requests[i].response for i in rows]
        B, L = len(rows), max(len(c) for c in conts)
        ids, mask = padded_batch(conts, self.pad_id, self.device)
        P = 0 if state is None else state.length
        if state is not None:  # every row reads the one copy of the prefix; nothing is kept after the forward
            kwargs = {self.cache_argument: seams.read_only_prefix_cache(state.layers), "use_cache": True}
            mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
        else:
            kwargs = {"use_cache": False}
        position_ids = torch.arange(P, P + L, device=self.device).expand(B, -1)
        scored = sum(requests[i].num_scored for i in rows)
        own_head_calls = -(-scored // self.head_chunk)
        head_calls = self._in_step(own_head_calls)
        hidden = self.backbone(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs
        ).last_hidden_state
        # The hidden state at position j predicts continuation token j + 1; the prefix's last one predicts token 0.
        if state is not None:
            hidden = torch.cat([state.hidden.expand(B, -1)[:, None].to(hidden.dtype), hidden[:, :-1]], dim=1)
            first = 0
        else:
            hidden = hidden[:, :-1]  # (B, L-1, H) predicting tokens 1..L-1
            first = 1
        sel_rows, sel_pos, owner = [], [], []
        for b, i in enumerate(rows):
            start = len(requests[i].context) - first
            n = requests[i].num_scored
            sel_rows += [b] * n
            sel_pos += [start + k for k in requests[i].positions]
            owner += [b] * n
        # Under a split `device_map` the hidden states come back on the last layer's device, not the inputs'
        sel_rows_t = torch.tensor(sel_rows, device=hidden.device)
        sel_pos_t = torch.tensor(sel_pos, device=hidden.device)
        hsel = hidden[sel_rows_t, sel_pos_t]
        targets = ids.to(hidden.device)[sel_rows_t, sel_pos_t + first]
        lp = head_log_probs(
            self.lm, self.head, hsel.to(self.head.weight.device), targets.to(self.head.weight.device), self.head_chunk
        )
        self._pad_head_calls(own_head_calls, head_calls)
        sums = torch.zeros(B, dtype=torch.float64, device=lp.device).index_add_(
            0, torch.tensor(owner, device=lp.device), lp.double()
        )
        tokens = None
        if per_token:  # `lp` runs row by row, each row's response tokens in order
            tokens = np.split(lp.float().cpu().numpy(), np.cumsum([requests[i].num_scored for i in rows])[:-1])
        return sums.tolist(), tokens


DEFAULT_TOKENS = {"cpu": 2048}  # elsewhere (an accelerator): ACCELERATOR_TOKENS
ACCELERATOR_TOKENS = 16384


def check_positive(name: str, value) -> None:
    """Refuse `value` unless it is None or a positive integer, naming `name`."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")


class ScoringBudget:
    """Token positions one scoring forward may hold: for each row, the prefix it attends to plus its padded
    continuation. One budget serves every scoring call of a run (the trainers keep one), so that an out-of-memory
    back-off holds for the rest of it; under several processes every call starts from the smallest budget of any
    process.

    Args:
        tokens (`int`, *optional*): the budget; by default 16384 on an accelerator and 2048 on the CPU.
    """

    def __init__(self, tokens: int | None = None, argument: str = "tokens"):
        check_positive(argument, tokens)
        self.tokens = tokens
        self.backed_off = False

    def resolve(self, device: torch.device) -> int:
        if self.tokens is None:
            self.tokens = DEFAULT_TOKENS.get(device.type, ACCELERATOR_TOKENS)
        return self.tokens

    def agree(self, device: torch.device) -> None:
        """Every process takes the smallest budget of all (one `all_reduce`); every process must call it."""
        import torch.distributed as dist

        value = torch.tensor([self.resolve(device)], dtype=torch.long, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        self.tokens = int(value)

    def back_off(self, tokens: int) -> None:
        """After an out-of-memory error on a batch of `tokens` positions: at most half of them from now on."""
        self.tokens = max(1, min(self.tokens, tokens // 2))
        self.backed_off = True


def score_requests(
    model,
    requests: Sequence[LogProbRequest],
    *,
    batch_size: int | None = None,
    max_batch_tokens: int | ScoringBudget | None = None,
    show_progress: bool = True,
    desc: str = "Scoring",
    distributed: str | None = None,
    sharing: str = "auto",
    compute_dtype: torch.dtype | None = None,
    forward_overhead: float | str | None = None,
    per_token: bool = False,
) -> LogProbs:
    """Summed log-probabilities of each request's response, computed with shared-prefix KV reuse.

    Args:
        model (`PreTrainedModel` or `PeftModel`): a causal LM, possibly quantised or wrapped by accelerate.
        requests (`Sequence[LogProbRequest]`): what to score.
        batch_size (`int`, *optional*): most continuations per forward; by default only the token budget limits.
        max_batch_tokens (`int` or [`ScoringBudget`], *optional*): token positions per forward, counting for each
            row the shared prefix it attends to and its padded continuation; defaults to 16384 on an accelerator
            and 2048 on the CPU. A [`ScoringBudget`] keeps an out-of-memory back-off across calls.
        show_progress (`bool`, *optional*, defaults to `True`): show a progress bar (on the main process).
        desc (`str`, *optional*): the progress bar's label.
        distributed (`str`, *optional*): under a multi-process launch, every process must make the same call:
            `"shard"` (the default there) splits `requests` between the processes and returns all results on every
            one; `"lockstep"` scores each process's own `requests`, keeping the model calls in step
            ([`ForwardLockstep`]); `"local"` scores on this process alone, with no collective calls. Ignored
            with a single process.
        sharing (`str`, *optional*, defaults to `"auto"`): how prefixes share their KV cache. `"tree"`: the common
            start of different prefixes runs once (the prefix tree, [`plan_prefixes`]), in the most forwards;
            `"flat"`: whole prefixes used more than once run once; `"none"`: every sequence runs whole, in the
            fewest, widest forwards. `"auto"` picks the cheapest by [`choose_sharing`]: tokens run plus a fixed cost
            per forward (`forward_overhead`). The results are the same up to floating-point rounding.
        forward_overhead (`float` or `"measure"`, *optional*): that fixed cost, in tokens' worth of compute. By
            default 32 on the CPU and 256 on an accelerator (a GPU's bf16 peak over its memory bandwidth: the tokens
            a forward could compute while it reads the weights once), 1024 there for a 4-bit or FSDP/ZeRO-3-sharded
            model (every forward dequantises or gathers every weight), [`default_overhead`]; docs/benchmarks.md says
            where each comes from. `"measure"` times the
            model once per device and dtype ([`measure_forward_overhead`]); the default is fixed so that a run's
            scores never depend on timing.
        compute_dtype (`torch.dtype`, *optional*): run the model under autocast to this dtype when its weights are
            of another floating type (what mixed-precision training does); the log-sum-exp is float32 either way.
        per_token (`bool`, *optional*, defaults to `False`): also return each response's token log-probabilities
            (`LogProbs.tokens`), from the same forwards.

    Returns:
        [`LogProbs`] aligned with `requests`.

    Models whose layers are all full or sliding-window attention share prefixes (every position of a prefix is kept,
    so a window shorter than the prefix is applied exactly); models with other layers (recurrent, linear or chunked
    attention, shared KV) score each request's whole sequence, with the same results. On an out-of-memory error the
    budget is halved for the rest of the budget's life and scoring goes on; a single continuation that does not fit
    re-raises, as does any out-of-memory error while processes are kept in step. Runs under `torch.no_grad()` in
    eval mode and restores the model's train/eval mode.

    Example:

    ```python
    >>> req = LogProbRequest(prefix=(1, 2, 3), context=(4,), response=(5, 6))
    >>> score_requests(model, [req]).sums  # log p(5, 6 | 1, 2, 3, 4)
    ```
    """
    check_positive("batch_size", batch_size)
    if isinstance(max_batch_tokens, ScoringBudget):
        budget = max_batch_tokens
    else:
        budget = ScoringBudget(max_batch_tokens, "max_batch_tokens")
    mode = resolve_mode(distributed)
    device = execution_device(model)
    if sharing not in SHARINGS:
        raise ValueError(f"`sharing` must be one of {list(SHARINGS)}, got {sharing!r}.")
    if not (
        forward_overhead is None
        or forward_overhead == "measure"
        or (
            isinstance(forward_overhead, (int, float))
            and not isinstance(forward_overhead, bool)
            and forward_overhead >= 0
        )
    ):
        raise ValueError(f"`forward_overhead` must be None, a number >= 0 or 'measure', got {forward_overhead!r}.")
    options = dict(
        batch_size=batch_size,
        budget=budget,
        desc=desc,
        sharing=sharing,
        compute_dtype=compute_dtype,
        forward_overhead=forward_overhead,
        per_token=per_token,
    )
    if mode == "local":
        return _score_requests(model, requests, None, show_progress=show_progress, **options)
    budget.agree(device)
    lockstep = ForwardLockstep(device)
    if mode == "lockstep":
        return _score_requests(model, requests, lockstep, show_progress=show_progress, **options)
    state = PartialState()
    with state.split_between_processes(list(range(len(requests)))) as mine:
        local = _score_requests(
            model,
            [requests[i] for i in mine],
            lockstep,
            show_progress=show_progress and state.is_main_process,
            **options,
        )
    sums = np.full(len(requests), np.nan)
    tokens = [None] * len(requests) if per_token else None
    for positions, values, arrays in gather_object([(mine, local.sums, local.tokens)]):
        sums[positions] = values
        if per_token:
            for position, array in zip(positions, arrays):
                tokens[position] = array
    return LogProbs(sums, np.array([r.num_scored for r in requests], dtype=np.int64), tokens)


def _score_requests(
    model,
    requests,
    lockstep: ForwardLockstep | None,
    *,
    batch_size,
    budget,
    show_progress,
    desc,
    sharing,
    compute_dtype,
    forward_overhead,
    per_token,
) -> LogProbs:
    n = len(requests)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([r.num_scored for r in requests], dtype=np.int64)
    tokens = [None] * n if per_token else None
    if n == 0 and lockstep is None:
        return LogProbs(sums, counts, tokens)

    device = execution_device(model)
    budget.resolve(device)
    runner = _ForwardRunner(model, device, lockstep, compute_dtype, budget)
    bar = tqdm(total=n, desc=desc, disable=not show_progress, leave=False)
    with (
        torch.no_grad(),
        eval_mode(model),
        unsharded_ancestors(model, runner.backbone, runner.head),
        runner.compute(),
    ):
        if not runner.shares_prefixes:
            _warn_unshared(runner)
            sharing = "none"
        elif sharing == "auto":
            if forward_overhead == "measure":
                overhead = measure_forward_overhead(runner, lockstep)
            elif forward_overhead is None:
                overhead = default_overhead(device.type, heavy_forward(model))
            else:
                overhead = float(forward_overhead)
            sharing = choose_sharing(requests, budget.tokens, batch_size, overhead)
        if sharing == "none":
            requests = [LogProbRequest((), r.prefix + r.context, r.response, r.scored) for r in requests]
        plan = plan_prefixes([r.prefix for r in requests], tree=sharing == "tree")
        stack: list[tuple[tuple[int, ...], PrefixState]] = []  # the pieces above the current one, with their states
        for node in plan.nodes:
            while stack and node[: len(stack[-1][0])] != stack[-1][0]:
                stack.pop()  # left that branch: its state is freed
            state = None
            if node:
                parent, parent_state = stack[-1] if stack and plan.tree else ((), None)
                state = runner.prefix_state(node[len(parent) :], parent_state)
                stack.append((node, state))
            idx = plan.requests[node]
            if not idx:
                continue
            # Each request continues from this piece: the rest of its own prefix, its context, its response
            group = [
                LogProbRequest(node, r.prefix[len(node) :] + r.context, r.response, r.scored)
                for r in map(requests.__getitem__, idx)
            ]
            group_sums, group_tokens = _score_group(runner, group, state, batch_size, budget, lockstep, bar, per_token)
            sums[idx] = group_sums
            if per_token:
                for i, array in zip(idx, group_tokens):
                    tokens[i] = array
        runner.finish()
    bar.close()
    return LogProbs(sums, counts, tokens)


_WARNED_UNSHARED: set[str] = set()


def _warn_unshared(runner: _ForwardRunner) -> None:
    name = type(runner.lm).__name__
    if name not in _WARNED_UNSHARED:
        _WARNED_UNSHARED.add(name)
        logger.warning(
            "%s has %s layers, whose cache cannot be shared exactly between sequences: each scored sequence runs "
            "whole, demonstrations included (same scores, more compute).",
            name,
            "/".join(runner.unshareable),
        )


_OVERHEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): overhead}


def measure_forward_overhead(runner: _ForwardRunner, lockstep: ForwardLockstep | None = None) -> float:
    """The fixed cost of one forward of the runner's model, in tokens' worth of compute: a forward of `n` tokens
    costs about `overhead + n`. Measured once per model, device and dtype, by timing a one-token forward against a
    256-token one (each the fastest of three, after a warm-up); under several processes the largest measurement of
    any process is used, so that all choose alike. On an accelerator this is the kernel launches and, under 4-bit
    quantisation, the dequantisation of every weight, so it can be worth hundreds of tokens; on a CPU a few."""
    known = _OVERHEADS.setdefault(runner.lm, {})
    key = (str(runner.device), str(runner.compute_dtype))
    if key not in known:
        import time

        def timed(length: int) -> float:
            ids = torch.full((1, length), runner.pad_id, dtype=torch.long, device=runner.device)
            best = float("inf")
            for _ in range(3):
                if runner.device.type == "cuda":
                    torch.cuda.synchronize(runner.device)
                start = time.perf_counter()
                runner.backbone(input_ids=ids, use_cache=False)
                if runner.device.type == "cuda":
                    torch.cuda.synchronize(runner.device)
                best = min(best, time.perf_counter() - start)
            return best

        config = runner.lm.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        length = min(256, getattr(config, "max_position_embeddings", None) or 256)
        timed(8)  # warm-up
        one, many = timed(1), timed(length)
        per_token = max(many - one, 1e-9) / (length - 1)
        overhead = one / per_token
        if lockstep is not None:
            import torch.distributed as dist

            value = torch.tensor([overhead], dtype=torch.float64, device=runner.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            overhead = float(value)
        known[key] = overhead
    return known[key]


def _score_group(
    runner, group, state, batch_size, budget: ScoringBudget, lockstep, bar, per_token: bool = False
) -> tuple[np.ndarray, list | None]:
    """Sums of `group` (requests continuing from one prefix state, or none), and with `per_token` their token
    log-probabilities, in batches under the row cap and the token budget; longest first, so that memory errors come
    early. On one the budget is halved for good and the batch retried; under lockstep every process learns of it at
    the next step and takes the same budget. Where no retry can help (one sequence, or a sharded model whose
    forward the other processes are still inside), every process that can be told stops with the error."""
    sums = np.zeros(len(group), dtype=np.float64)
    tokens = [None] * len(group) if per_token else None
    lengths = [len(r.context) + len(r.response) for r in group]
    order = sorted(range(len(group)), key=lambda i: -lengths[i])
    prefix = 0 if state is None else state.length
    pos = 0
    while pos < len(order):
        batch = order[pos : batch_end(order, pos, lengths, batch_size, budget.tokens, prefix)]
        try:
            values, arrays = runner.score_batch(group, batch, state, per_token)
        except PeerOutOfMemoryError:
            raise  # another process's error, already agreed on: nothing to tell the others
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            held = len(batch) * (prefix + lengths[batch[0]])
            if len(batch) == 1 or not runner.can_fail_alone:
                runner.stop_together()
                reason = "a single sequence" if len(batch) == 1 else "a sharded model's processes cannot retry alone"
                raise torch.OutOfMemoryError(
                    f"Out of memory scoring {len(batch)} sequence(s) of {held} token positions in all ({reason}). "
                    "Lower the scoring token budget (`ica_scoring_max_tokens`, `--scoring-max-tokens`), currently "
                    f"{budget.tokens}, or give fewer or shorter demonstrations."
                ) from error
            budget.back_off(held)
            runner.failure = RETRY  # under lockstep the others learn of it at the next step and take this budget too
            logger.warning(
                "Out of memory scoring %d sequences (%d token positions); the scoring budget is now %d positions.",
                len(batch),
                held,
                budget.tokens,
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        sums[batch] = values
        if per_token:
            for i, array in zip(batch, arrays):
                tokens[i] = array
        pos += len(batch)
        bar.update(len(batch))
    return sums, tokens
