"""Fused log-probability scoring with shared prefixes.

A [`LogProbRequest`] asks for `log p(response | prefix, context)`. Requests that share a prefix (the chat template's
opening and a demonstration block) run that prefix once; its KV cache is expanded without copying over every
continuation of the group. The LM head is applied only at response positions, so memory scales with the scored
tokens, not with `batch x length x vocabulary`. Results come back in the caller's order and equal a plain forward of
each full sequence up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

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


HEAD_CHUNK = 4096  # hidden states per LM-head call: bounds the float32 logits to HEAD_CHUNK x vocabulary


def head_log_probs(lm, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of `targets` (N,) under the LM head applied to `hidden` (N, H), in float32 (float64 for a
    float64 model).

    `logit[target] - logsumexp(logits)` rather than `log_softmax`: on the CPU, PyTorch's float32 `log_softmax` over a
    large vocabulary is biased (about +2e-5 nats per token over 49k entries, always the same sign, so a sum over
    hundreds of tokens drifts by 1e-3), while its float32 `logsumexp` is not (see docs/benchmarks.md)."""
    chunk = HEAD_CHUNK
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


def _batch_end(order: list[int], start: int, lengths, batch_size: int | None, max_batch_tokens: int) -> int:
    """End of the batch starting at `order[start]` (sorted longest first) under a row cap and a padded-token budget;
    a batch always holds at least one row."""
    longest = lengths[order[start]]
    rows = max(1, max_batch_tokens // max(1, longest))
    if batch_size is not None:
        rows = min(rows, batch_size)
    return min(len(order), start + rows)


class _Scorer:
    def __init__(self, model, device, lockstep: ForwardLockstep | None = None):
        self.lm, self.backbone, self.head = backbone_and_head(model)
        self.device = device
        self.pad_id = pad_id(self.lm)
        self.lockstep = lockstep
        config = self.lm.config.get_text_config() if hasattr(self.lm.config, "get_text_config") else self.lm.config
        self.hidden_size = config.hidden_size

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
            self.backbone(input_ids=torch.tensor([[self.pad_id]], device=self.device))
            self._pad_head_calls(0, head_calls)

    def prefix_state(self, prefix: tuple[int, ...]):
        """Run a prefix once at batch 1: per-layer (k, v) pairs and the hidden state that predicts the next token."""
        head_calls = self._in_step(0)
        ids = torch.tensor([prefix], device=self.device)
        out = self.backbone(input_ids=ids, use_cache=True)
        self._pad_head_calls(0, head_calls)
        layers = seams.cache_key_values(out.past_key_values)
        return layers, out.last_hidden_state[:, -1]  # (1, H)

    def score_batch(self, requests: Sequence[LogProbRequest], rows: list[int], prefix_state) -> list[float]:
        """Score `rows` of `requests` against a shared prefix state (or none), returning one sum per row."""
        conts = [requests[i].context + requests[i].response for i in rows]
        B, L = len(rows), max(len(c) for c in conts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        for b, cont in enumerate(conts):
            ids[b, : len(cont)] = torch.tensor(cont, device=self.device)
            mask[b, : len(cont)] = 1
        P = 0
        kwargs = {}
        if prefix_state is not None:
            layers, _ = prefix_state
            P = layers[0][0].shape[-2]
            kwargs["past_key_values"] = seams.shared_prefix_cache(layers, B, self.lm.config)  # zero-copy
            kwargs["use_cache"] = True
            mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
        position_ids = torch.arange(P, P + L, device=self.device).expand(B, -1)
        scored = sum(len(requests[i].response) for i in rows)
        own_head_calls = -(-scored // HEAD_CHUNK)
        head_calls = self._in_step(own_head_calls)
        hidden = self.backbone(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs
        ).last_hidden_state
        # The hidden state at position j predicts continuation token j + 1; the prefix's last one predicts token 0.
        if prefix_state is not None:
            hidden = torch.cat([prefix_state[1].expand(B, -1)[:, None], hidden[:, :-1]], dim=1)  # (B, L, H)
            first = 0
        else:
            hidden = hidden[:, :-1]  # (B, L-1, H) predicting tokens 1..L-1
            first = 1
        sel_rows, sel_pos, targets, owner = [], [], [], []
        for b, i in enumerate(rows):
            start = len(requests[i].context)
            n = len(requests[i].response)
            sel_rows += [b] * n
            sel_pos += range(start - first, start + n - first)
            targets.append(ids[b, start : start + n])
            owner += [b] * n
        hsel = hidden[torch.tensor(sel_rows, device=self.device), torch.tensor(sel_pos, device=self.device)]
        lp = head_log_probs(
            self.lm, self.head, hsel.to(self.head.weight.device), torch.cat(targets).to(self.head.weight.device)
        )
        self._pad_head_calls(own_head_calls, head_calls)
        sums = torch.zeros(B, dtype=torch.float64, device=lp.device).index_add_(
            0, torch.tensor(owner, device=lp.device), lp.double()
        )
        return sums.tolist()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def score_requests(
    model,
    requests: Sequence[LogProbRequest],
    *,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    show_progress: bool = True,
    desc: str = "Scoring",
    distributed: str | None = None,
) -> LogProbs:
    """Summed log-probabilities of each request's response, computed with shared-prefix KV reuse.

    Args:
        model (`PreTrainedModel` or `PeftModel`): a causal LM, possibly quantised or wrapped by accelerate.
        requests (`Sequence[LogProbRequest]`): what to score.
        batch_size (`int`, *optional*): most continuations per forward; by default only `max_batch_tokens` limits.
        max_batch_tokens (`int`, *optional*): padded continuation tokens per forward; defaults to 16384 on an
            accelerator and 512 on the CPU, where wide padded batches measured slower than small ones.
        show_progress (`bool`, *optional*, defaults to `True`): show a progress bar (on the main process).
        desc (`str`, *optional*): the progress bar's label.
        distributed (`str`, *optional*): under a multi-process launch, every process must make the same call:
            `"shard"` (the default there) splits `requests` between the processes and returns all results on every
            one; `"lockstep"` scores each process's own `requests`, keeping the model calls in step
            ([`ForwardLockstep`]); `"local"` scores on this process alone, with no collective calls. Ignored
            with a single process.

    Returns:
        [`LogProbs`] aligned with `requests`.

    On an out-of-memory error the batch is halved and scoring goes on; a single continuation that does not fit
    re-raises, as does any out-of-memory error while processes are kept in step. Runs under `torch.no_grad()` in
    eval mode and restores the model's train/eval mode.

    Example:

    ```python
    >>> req = LogProbRequest(prefix=(1, 2, 3), context=(4,), response=(5, 6))
    >>> score_requests(model, [req]).sums  # log p(5, 6 | 1, 2, 3, 4)
    ```
    """
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
    mode = resolve_mode(distributed)
    options = dict(batch_size=batch_size, max_batch_tokens=max_batch_tokens, desc=desc)
    if mode == "local":
        return _score_requests(model, requests, None, show_progress=show_progress, **options)
    lockstep = ForwardLockstep(next(unwrap_causal_lm(model).parameters()).device)
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
    model, requests, lockstep: ForwardLockstep | None, *, batch_size, max_batch_tokens, show_progress, desc
) -> LogProbs:
    n = len(requests)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([len(r.response) for r in requests], dtype=np.int64)
    if n == 0 and lockstep is None:
        return LogProbs(sums, counts)

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.prefix, []).append(i)
    # A prefix used once gains nothing from caching: run such requests as full rows batched together.
    work: list[tuple[tuple[int, ...], list[int], Sequence[LogProbRequest]]] = []
    singles: list[int] = []
    for prefix, idx in groups.items():
        if prefix and len(idx) > 1:
            work.append((prefix, idx, requests))
        else:
            singles.extend(idx)
    if singles:
        flat = [LogProbRequest((), r.prefix + r.context, r.response) for r in (requests[i] for i in singles)]
        work.append(((), list(range(len(flat))), flat))
        single_ids = singles
    device = next(unwrap_causal_lm(model).parameters()).device
    if max_batch_tokens is None:
        max_batch_tokens = 512 if device.type == "cpu" else 16384
    scorer = _Scorer(model, device, lockstep)
    bar = tqdm(total=n, desc=desc, disable=not show_progress, leave=False)
    with torch.no_grad(), eval_mode(model), unsharded_ancestors(model, scorer.backbone, scorer.head):
        for prefix, idx, reqs in work:
            state = scorer.prefix_state(prefix) if prefix else None
            lengths = {i: len(reqs[i].context) + len(reqs[i].response) for i in idx}
            order = sorted(idx, key=lambda i: -lengths[i])  # longest first: memory errors come early
            cap = batch_size
            pos = 0
            while pos < len(order):
                batch = order[pos : _batch_end(order, pos, lengths, cap, max_batch_tokens)]
                try:
                    values = scorer.score_batch(reqs, batch, state)
                except (torch.OutOfMemoryError, RuntimeError) as error:
                    if not _is_oom(error) or len(batch) == 1 or lockstep is not None:
                        raise
                    cap = max(1, len(batch) // 2)
                    logger.warning("Out of memory scoring %d sequences; retrying with batches of %d.", len(batch), cap)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                targets = [single_ids[i] for i in batch] if reqs is not requests else batch
                sums[targets] = values
                pos += len(batch)
                bar.update(len(batch))
        scorer.finish()
    bar.close()
    return LogProbs(sums, counts)


def token_counts(requests: Sequence[LogProbRequest]) -> tuple[int, int, int]:
    """(tokens a naive per-request forward runs, tokens the fused path runs, number of distinct shared prefixes)."""
    naive = sum(r.num_tokens for r in requests)
    groups: dict[tuple[int, ...], int] = {}
    for r in requests:
        groups[r.prefix] = groups.get(r.prefix, 0) + 1
    fused = sum(len(r.context) + len(r.response) for r in requests) + sum(len(p) for p in groups)
    shared = sum(1 for p, c in groups.items() if p and c > 1)
    return naive, fused, shared
