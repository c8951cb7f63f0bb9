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

import contextlib
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
from .distributed import ForwardLockstep, resolve_mode, unsharded_ancestors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogProbRequest:
    """Token ids of one scored sequence `prefix + context + response`; only `response` tokens are scored.

    Args:
        prefix (`tuple[int, ...]`): leading tokens that other requests may share; run once per distinct prefix.
        context (`tuple[int, ...]`): the request's own unscored tokens (its prompt).
        response (`tuple[int, ...]`): the scored tokens.
    """

    prefix: tuple[int, ...]
    context: tuple[int, ...]
    response: tuple[int, ...]

    def __post_init__(self):
        if not self.response:
            raise ValueError("LogProbRequest.response is empty: there is nothing to score.")
        if not self.prefix and not self.context:
            raise ValueError("LogProbRequest needs at least one prefix or context token to predict the response from.")

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + len(self.context) + len(self.response)


@dataclass
class LogProbs:
    """Summed response log-probabilities (`float64`, shape `(N,)`) and response token counts (`int64`, `(N,)`)."""

    sums: np.ndarray
    counts: np.ndarray


def unwrap_causal_lm(model):
    """The causal LM inside accelerate/DDP and PEFT wrappers (PEFT's injected adapter layers stay active)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def backbone_and_head(model):
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    if head is None or backbone is None:
        raise ValueError(f"{type(lm).__name__} is not a causal language model with an output embedding.")
    return lm, backbone, head


@contextlib.contextmanager
def eval_mode(model):
    """Put `model` in eval mode and restore each module's previous mode afterwards.

    bitsandbytes' 4-bit layers are left in training mode: on CPUs with AVX512-BF16 an eval-mode, no-grad forward
    repacks their weights for inference once and for all, after which training gets no gradient through them.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for module in model.modules():
        if seams.repacks_in_eval(module):
            module.training = True  # their mode changes nothing else: they have no dropout
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def logit_transform(config) -> tuple[float, float | None]:
    """`(scale, softcap)` such that the model's logits are `softcap * tanh(scale * head(h) / softcap)` (no tanh when
    `softcap` is None): what a model's forward applies after its LM head, read from its (text) config exactly as
    TRL's fused LM head reads it (`trl.trainer.utils.add_fused_lm_head`, TRL 1.16), so that log p(y | x) read off a
    TRL training forward and the engine's log p(y | D, x) use one definition. `logit_scale` (Cohere) or
    `output_multiplier` multiply; `lm_head_multiplier` (Falcon-H1) multiplies; `logits_scaling` divides (Granite,
    MiniCPM3; HyperCLOVA X multiplies); `final_logit_softcapping` caps (Gemma 2/3)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap


HEAD_BYTES = 256 * 2**20  # float32 logits per LM-head call: 512 positions of a 128k vocabulary, 1,365 of 49k


def head_chunk(vocab_size: int) -> int:
    """Positions per LM-head call so that a call's float32 logits take at most `HEAD_BYTES` (the log-sum-exp and
    the soft-capping make temporaries of the same size)."""
    return max(1, HEAD_BYTES // (4 * max(1, vocab_size)))


def head_log_probs(lm, head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Log-probabilities of `targets` (N,) under the LM head applied to `hidden` (N, H), in float32 (float64 for a
    float64 model), `chunk` positions per head call (default: [`head_chunk`] of the head's vocabulary).

    `logit[target] - logsumexp(logits)` rather than `log_softmax`: on the CPU, PyTorch's float32 `log_softmax` over a
    large vocabulary is biased (about +2e-5 nats per token over 49k entries, always the same sign, so a sum over
    hundreds of tokens drifts by 1e-3), while its float32 `logsumexp` is not (see docs/benchmarks.md). Logits of a
    bf16 or fp16 head are raised to float32 before the log-sum-exp."""
    chunk = chunk or head_chunk(head.weight.shape[0])
    scale, softcap = logit_transform(lm.config)
    out = []
    for start in range(0, hidden.size(0), chunk):
        logits = head(hidden[start : start + chunk])
        if logits.dtype != torch.float64:
            logits = logits.float()
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        target = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        out.append(target - torch.logsumexp(logits, -1))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=dtype)


def pad_id(lm) -> int:
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def padded_batch(sequences, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(ids, mask)` of token sequences, `(B, longest)` long tensors on `device`: filled on the CPU and
    moved in one copy each, rather than one small host-to-device copy per row."""
    length = max(len(x) for x in sequences)
    ids = np.full((len(sequences), length), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def _batch_end(order: list[int], start: int, lengths, batch_size: int | None, max_tokens: int, prefix: int) -> int:
    """End of the batch starting at `order[start]` (sorted longest first) under a row cap and a token budget that
    counts, for each row, the `prefix` positions it attends to and its padded continuation (the keys and values one
    layer holds for the batch while it attends); a batch always holds at least one row."""
    longest = lengths[order[start]]
    rows = max(1, max_tokens // max(1, prefix + longest))
    if batch_size is not None:
        rows = min(rows, batch_size)
    return min(len(order), start + rows)


class PrefixState(NamedTuple):
    """A prefix run once: per-layer `(keys, values)` at batch 1 with every position (sliding-window layers too), the
    hidden state `(1, H)` that predicts the next token, and the prefix's length."""

    layers: list
    hidden: torch.Tensor
    length: int


class _Scorer:
    def __init__(self, model, device, lockstep: ForwardLockstep | None = None, compute_dtype=None):
        self.lm, self.backbone, self.head = backbone_and_head(model)
        self.device = device
        self.pad_id = pad_id(self.lm)
        self.lockstep = lockstep
        config = self.lm.config.get_text_config() if hasattr(self.lm.config, "get_text_config") else self.lm.config
        self.hidden_size = config.hidden_size
        self.head_chunk = head_chunk(self.head.weight.shape[0])
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
        return head_calls if self.lockstep is None else self.lockstep.step(True, head_calls)

    def _pad_head_calls(self, done: int, wanted: int) -> None:
        for _ in range(wanted - done):  # match processes that score more tokens in this step
            self.head(torch.zeros(1, self.hidden_size, dtype=self.head.weight.dtype, device=self.device))

    def finish(self) -> None:
        """With lockstep, run one-token dummy steps until every process has run out of work."""
        if self.lockstep is None:
            return
        while (head_calls := self.lockstep.step(False, 0)) >= 0:
            self.backbone(input_ids=torch.tensor([[self.pad_id]], device=self.device), use_cache=False)
            self._pad_head_calls(0, head_calls)

    def prefix_state(self, segment: tuple[int, ...], parent: PrefixState | None = None) -> PrefixState:
        """Run a prefix piece once at batch 1, after `parent` (the piece before it) if given."""
        head_calls = self._in_step(0)
        start = parent.length if parent is not None else 0
        cache = seams.full_cache(parent.layers if parent is not None else None)  # the parent's tensors stay as is
        out = self.backbone(
            input_ids=torch.tensor([segment], device=self.device),
            position_ids=torch.arange(start, start + len(segment), device=self.device)[None],
            use_cache=True,
            **{self.cache_argument: cache},
        )
        self._pad_head_calls(0, head_calls)
        layers = seams.cache_key_values(cache)
        length = start + len(segment)
        if not layers or any(k.shape[-2] != length or v.shape[-2] != length for k, v in layers):
            raise seams.SeamError(
                "a `DynamicCache` without a config keeping every position of every layer (transformers.cache_utils)",
                f"after a {length}-token prefix the layers hold {sorted({k.shape[-2] for k, _ in layers})} positions",
            )
        return PrefixState(layers, out.last_hidden_state[:, -1], length)

    def score_batch(self, requests: Sequence[LogProbRequest], rows: list[int], state: PrefixState | None) -> list:
        """Score `rows` of `requests` against a shared prefix state (or none), returning one sum per row."""
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
        scored = sum(len(requests[i].response) for i in rows)
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
            start = len(requests[i].context)
            n = len(requests[i].response)
            sel_rows += [b] * n
            sel_pos += range(start - first, start + n - first)
            owner += [b] * n
        sel_rows_t = torch.tensor(sel_rows, device=self.device)
        sel_pos_t = torch.tensor(sel_pos, device=self.device)
        hsel = hidden[sel_rows_t, sel_pos_t]
        targets = ids[sel_rows_t, sel_pos_t + first]
        lp = head_log_probs(
            self.lm, self.head, hsel.to(self.head.weight.device), targets.to(self.head.weight.device), self.head_chunk
        )
        self._pad_head_calls(own_head_calls, head_calls)
        sums = torch.zeros(B, dtype=torch.float64, device=lp.device).index_add_(
            0, torch.tensor(owner, device=lp.device), lp.double()
        )
        return sums.tolist()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


DEFAULT_TOKENS = {"cpu": 2048}  # elsewhere (an accelerator): ACCELERATOR_TOKENS
ACCELERATOR_TOKENS = 16384


def check_positive(name: str, value) -> None:
    """Refuse `value` unless it is None or a positive integer, naming `name`."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")


def autocast_to(device: torch.device, compute_dtype, weights_dtype):
    """Autocast to `compute_dtype` when it differs from the weights' floating dtype (what accelerate's mixed
    precision does around `model.forward`); otherwise nothing."""
    if compute_dtype is None or compute_dtype == weights_dtype or not weights_dtype.is_floating_point:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


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
            default 32 on the CPU (measured for SmolLM2-135M on two cores: 29-31) and 256 on an accelerator (a
            GPU's bf16 peak over its memory bandwidth, 150-300 from an A100 to an H200: the tokens a forward could
            compute while it reads the weights once). `"measure"` times the model once per device and dtype
            ([`measure_forward_overhead`]); the default is fixed so that a run's scores never depend on timing.
        compute_dtype (`torch.dtype`, *optional*): run the model under autocast to this dtype when its weights are
            of another floating type (what mixed-precision training does); the log-sum-exp is float32 either way.

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
    device = next(unwrap_causal_lm(model).parameters()).device
    if sharing not in SHARINGS:
        raise ValueError(f"`sharing` must be one of {list(SHARINGS)}, got {sharing!r}.")
    if not (forward_overhead is None or forward_overhead == "measure" or (
        isinstance(forward_overhead, (int, float)) and not isinstance(forward_overhead, bool) and forward_overhead >= 0
    )):  # fmt: skip
        raise ValueError(f"`forward_overhead` must be None, a number >= 0 or 'measure', got {forward_overhead!r}.")
    options = dict(
        batch_size=batch_size, budget=budget, desc=desc, sharing=sharing, compute_dtype=compute_dtype,
        forward_overhead=forward_overhead,
    )  # fmt: skip
    if mode == "local":
        return _score_requests(model, requests, None, show_progress=show_progress, **options)
    budget.agree(device)
    lockstep = ForwardLockstep(device)
    if mode == "lockstep":
        return _score_requests(model, requests, lockstep, show_progress=show_progress, **options)
    state = PartialState()
    with state.split_between_processes(list(range(len(requests)))) as mine:
        local = _score_requests(
            model, [requests[i] for i in mine], lockstep, show_progress=show_progress and state.is_main_process,
            **options,
        )  # fmt: skip
    sums = np.full(len(requests), np.nan)
    for positions, values in gather_object([(mine, local.sums)]):
        sums[positions] = values
    return LogProbs(sums, np.array([len(r.response) for r in requests], dtype=np.int64))


def _score_requests(
    model, requests, lockstep: ForwardLockstep | None, *, batch_size, budget, show_progress, desc, sharing,
    compute_dtype, forward_overhead,
) -> LogProbs:  # fmt: skip
    n = len(requests)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([len(r.response) for r in requests], dtype=np.int64)
    if n == 0 and lockstep is None:
        return LogProbs(sums, counts)

    device = next(unwrap_causal_lm(model).parameters()).device
    budget.resolve(device)
    scorer = _Scorer(model, device, lockstep, compute_dtype)
    bar = tqdm(total=n, desc=desc, disable=not show_progress, leave=False)
    with (
        torch.no_grad(),
        eval_mode(model),
        unsharded_ancestors(model, scorer.backbone, scorer.head),
        scorer.compute(),
    ):
        if not scorer.shares_prefixes:
            _warn_unshared(scorer)
            sharing = "none"
        elif sharing == "auto":
            if forward_overhead == "measure":
                overhead = measure_forward_overhead(scorer, lockstep)
            elif forward_overhead is None:
                overhead = DEFAULT_OVERHEAD.get(device.type, ACCELERATOR_OVERHEAD)
            else:
                overhead = float(forward_overhead)
            sharing = choose_sharing(requests, budget.tokens, batch_size, overhead)
        if sharing == "none":
            requests = [LogProbRequest((), r.prefix + r.context, r.response) for r in requests]
        plan = plan_prefixes([r.prefix for r in requests], tree=sharing == "tree")
        stack: list[tuple[tuple[int, ...], PrefixState]] = []  # the pieces above the current one, with their states
        for node in plan.nodes:
            while stack and node[: len(stack[-1][0])] != stack[-1][0]:
                stack.pop()  # left that branch: its state is freed
            state = None
            if node:
                parent, parent_state = stack[-1] if stack and plan.tree else ((), None)
                state = scorer.prefix_state(node[len(parent) :], parent_state)
                stack.append((node, state))
            idx = plan.requests[node]
            if not idx:
                continue
            # Each request continues from this piece: the rest of its own prefix, its context, its response
            group = [
                LogProbRequest(node, r.prefix[len(node) :] + r.context, r.response)
                for r in map(requests.__getitem__, idx)
            ]
            sums[idx] = _score_group(scorer, group, state, batch_size, budget, lockstep, bar)
        scorer.finish()
    bar.close()
    return LogProbs(sums, counts)


_WARNED_UNSHARED: set[str] = set()


def _warn_unshared(scorer: _Scorer) -> None:
    name = type(scorer.lm).__name__
    if name not in _WARNED_UNSHARED:
        _WARNED_UNSHARED.add(name)
        logger.warning(
            "%s has %s layers, whose cache cannot be shared exactly between sequences: each scored sequence runs "
            "whole, demonstrations included (same scores, more compute).",
            name,
            "/".join(scorer.unshareable),
        )


SHARINGS = ("auto", "tree", "flat", "none")
_OVERHEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): overhead}


DEFAULT_OVERHEAD = {"cpu": 32.0}  # elsewhere (an accelerator): ACCELERATOR_OVERHEAD; see `score_requests`
ACCELERATOR_OVERHEAD = 256.0


def measure_forward_overhead(scorer: _Scorer, lockstep: ForwardLockstep | None = None) -> float:
    """The fixed cost of one forward of the scorer's model, in tokens' worth of compute: a forward of `n` tokens
    costs about `overhead + n`. Measured once per model, device and dtype, by timing a one-token forward against a
    256-token one (each the fastest of three, after a warm-up); under several processes the largest measurement of
    any process is used, so that all choose alike. On an accelerator this is the kernel launches and, under 4-bit
    quantisation, the dequantisation of every weight, so it can be worth hundreds of tokens; on a CPU a few."""
    known = _OVERHEADS.setdefault(scorer.lm, {})
    key = (str(scorer.device), str(scorer.compute_dtype))
    if key not in known:
        import time

        def timed(length: int) -> float:
            ids = torch.full((1, length), scorer.pad_id, dtype=torch.long, device=scorer.device)
            best = float("inf")
            for _ in range(3):
                if scorer.device.type == "cuda":
                    torch.cuda.synchronize(scorer.device)
                start = time.perf_counter()
                scorer.backbone(input_ids=ids, use_cache=False)
                if scorer.device.type == "cuda":
                    torch.cuda.synchronize(scorer.device)
                best = min(best, time.perf_counter() - start)
            return best

        config = scorer.lm.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        length = min(256, getattr(config, "max_position_embeddings", None) or 256)
        timed(8)  # warm-up
        one, many = timed(1), timed(length)
        per_token = max(many - one, 1e-9) / (length - 1)
        overhead = one / per_token
        if lockstep is not None:
            import torch.distributed as dist

            value = torch.tensor([overhead], dtype=torch.float64, device=scorer.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            overhead = float(value)
        known[key] = overhead
    return known[key]


def _batches(lengths: list[int], prefix: int, batch_size: int | None, max_tokens: int) -> int:
    """How many forwards `_score_group` makes for continuations of `lengths` after a `prefix`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    count = pos = 0
    while pos < len(order):
        pos = _batch_end(order, pos, lengths, batch_size, max_tokens, prefix)
        count += 1
    return count


def sharing_costs(
    requests: Sequence[LogProbRequest], max_tokens: int, batch_size: int | None = None
) -> dict[str, tuple[int, int]]:
    """`(forwards, tokens)` each way of sharing would run for `requests` under the token budget: prefix pieces at
    batch 1 plus the batched continuations ([`score_requests`], `sharing`)."""
    out = {}
    for sharing in ("tree", "flat"):
        plan = plan_prefixes([r.prefix for r in requests], tree=sharing == "tree")
        forwards = sum(1 for node in plan.nodes if node)
        tokens = plan.piece_tokens
        for node, idx in plan.requests.items():
            if not idx:
                continue
            lengths = [len(requests[i].prefix) - len(node) + len(requests[i].context) + len(requests[i].response)
                       for i in idx]  # fmt: skip
            forwards += _batches(lengths, len(node), batch_size, max_tokens)
            tokens += sum(lengths)
        out[sharing] = (forwards, tokens)
    whole = [r.num_tokens for r in requests]
    out["none"] = (_batches(whole, 0, batch_size, max_tokens), sum(whole))
    return out


def choose_sharing(
    requests: Sequence[LogProbRequest], max_tokens: int, batch_size: int | None, overhead: float
) -> str:
    """The way of sharing with the least `forwards x overhead + tokens` ([`sharing_costs`]); ties go to the one
    that runs fewer tokens."""
    costs = sharing_costs(requests, max_tokens, batch_size)
    return min(costs, key=lambda name: (costs[name][0] * overhead + costs[name][1], costs[name][1]))


class TokenCounts(NamedTuple):
    """Tokens the forwards run for a list of requests, by three ways of running them.

    Attributes:
        naive: every request's full sequence on its own.
        flat: each distinct prefix once, plus every request's context and response (sharing whole prefixes only).
        tree: what [`score_requests`] runs: each piece of the prefix tree once ([`plan_prefixes`]), plus every
            request's tokens after its deepest shared piece.
        shared: distinct prefixes used by more than one request.
        pieces: prefix pieces run on their own (forwards before the batched ones).
    """

    naive: int
    flat: int
    tree: int
    shared: int
    pieces: int


def _score_group(scorer, group, state, batch_size, budget: ScoringBudget, lockstep, bar) -> np.ndarray:
    """Sums of `group` (requests continuing from one prefix state, or none), in batches under the row cap and the
    token budget; longest first, so that memory errors come early. On one the budget is halved for good and the batch
    retried (unless processes are in step, where one process cannot retry alone)."""
    sums = np.zeros(len(group), dtype=np.float64)
    lengths = [len(r.context) + len(r.response) for r in group]
    order = sorted(range(len(group)), key=lambda i: -lengths[i])
    prefix = 0 if state is None else state.length
    pos = 0
    while pos < len(order):
        batch = order[pos : _batch_end(order, pos, lengths, batch_size, budget.tokens, prefix)]
        try:
            values = scorer.score_batch(group, batch, state)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            held = len(batch) * (prefix + lengths[batch[0]])
            if len(batch) == 1 or lockstep is not None:
                raise torch.OutOfMemoryError(
                    f"Out of memory scoring {len(batch)} sequence(s) of {held} token positions in all "
                    f"({'a single sequence' if len(batch) == 1 else 'processes kept in step cannot retry alone'}). "
                    "Lower the scoring token budget (`ica_scoring_max_tokens`, `--scoring-max-tokens`), currently "
                    f"{budget.tokens}, or give fewer or shorter demonstrations."
                ) from error
            budget.back_off(held)
            logger.warning(
                "Out of memory scoring %d sequences (%d token positions); the scoring budget is now %d positions.",
                len(batch), held, budget.tokens,
            )  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        sums[batch] = values
        pos += len(batch)
        bar.update(len(batch))
    return sums


def token_counts(requests: Sequence[LogProbRequest]) -> TokenCounts:
    """Token counts of the naive, flat-shared and prefix-tree ways of running `requests` ([`TokenCounts`])."""
    naive = sum(r.num_tokens for r in requests)
    groups: dict[tuple[int, ...], int] = {}
    for r in requests:
        groups[r.prefix] = groups.get(r.prefix, 0) + 1
    continuations = sum(len(r.context) + len(r.response) for r in requests)
    flat = continuations + sum(len(p) for p in groups)
    shared = sum(1 for p, c in groups.items() if p and c > 1)
    plan = plan_prefixes([r.prefix for r in requests])
    tree = (
        continuations
        + plan.piece_tokens
        + sum(len(requests[i].prefix) - len(node) for node, idx in plan.requests.items() for i in idx)
    )
    return TokenCounts(naive, flat, tree, shared, sum(1 for node in plan.nodes if node))


MIN_PIECE = 4  # tokens: a shared piece shorter than this is run again by each request rather than on its own


class PrefixPlan(NamedTuple):
    """How [`score_requests`] runs a list of prefixes ([`plan_prefixes`]).

    Attributes:
        nodes: the shared pieces' full prefixes in lexicographic order, `()` (no cached prefix) first; each node's
            parent is the longest earlier node that is a prefix of it, so the order is a depth-first walk.
        requests: for each node, the requests scored against it (their prefixes start with it and no deeper node).
        piece_tokens: tokens the pieces run (each node minus its parent).
        tree: whether a node extends its parent's cache (`False`: every node runs from the start).
    """

    nodes: list[tuple[int, ...]]
    requests: dict[tuple[int, ...], list[int]]
    piece_tokens: int
    tree: bool = True


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_prefixes(prefixes: Sequence[tuple[int, ...]], min_piece: int = MIN_PIECE, tree: bool = True) -> PrefixPlan:
    """The prefix tree of the parts that `prefixes` share.

    A request's deepest shared point is its longest common start with any other prefix, which is reached by a
    neighbour in sorted order (a whole prefix when it occurs twice); the branch points between those are the common
    starts of neighbouring points. A piece shorter than `min_piece` tokens below its parent is not run on its own:
    its requests and children go to the parent. Every prefix token of the tree is then run exactly once.

    `tree=False` shares whole prefixes only: a prefix used by two or more requests runs once, the others run in full
    with their requests.
    """
    n = len(prefixes)
    order = sorted(range(n), key=lambda i: prefixes[i])
    deepest = [0] * n
    for a, b in zip(order, order[1:]):
        common = _common(prefixes[a], prefixes[b])
        if not tree:
            common = common if len(prefixes[a]) == len(prefixes[b]) == common else 0
        deepest[a], deepest[b] = max(deepest[a], common), max(deepest[b], common)
    points = {prefixes[i][: deepest[i]] for i in range(n)}
    if tree:
        ordered = sorted(points)
        points.update(a[: _common(a, b)] for a, b in zip(ordered, ordered[1:]))
    else:
        min_piece = 1
    points.add(())
    nodes: list[tuple[int, ...]] = []
    home: dict[tuple[int, ...], tuple[int, ...]] = {}  # each point's deepest kept node (itself when kept)
    piece_tokens = 0
    stack: list[tuple[int, ...]] = []  # kept ancestors of the current point; () is first and stays
    for point in sorted(points):
        while stack and point[: len(stack[-1])] != stack[-1]:
            stack.pop()
        parent = stack[-1] if stack and tree else ()
        if point == () or len(point) - len(parent) >= min_piece:
            nodes.append(point)
            stack.append(point)
            piece_tokens += len(point) - len(parent)
            home[point] = point
        else:
            home[point] = parent
    requests: dict[tuple[int, ...], list[int]] = {node: [] for node in nodes}
    for i in range(n):
        requests[home[prefixes[i][: deepest[i]]]].append(i)
    return PrefixPlan(nodes, requests, piece_tokens, tree)
