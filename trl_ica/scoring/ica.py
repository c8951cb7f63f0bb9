"""ICA scores: how much k holdout demonstrations in context raise the log-probability of a response.

score(x, y) = log p(y | D, x) - log p(y | x) under the current model (arXiv 2510.14459). A larger score means the
holdout examples make the response more likely: the example agrees with the holdout distribution.

`form="conditioned"` offers a variant: log p(y | D, x) alone, the response's likelihood with the holdout in context.
The difference cancels whatever makes y likely or unlikely given x alone, which isolates the holdout's pull (what
tells a pool's target examples from the rest), but it also cancels the signal of a response that does not answer
its own question, which the conditioned form keeps (see docs/scores.md, "Which score to trust").
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .demonstrations import (
    NEAREST_SELECTIONS,
    Embedder,
    check_choice,
    model_embeddings,
    select_demos,
    sentence_embedder,
)
from .engine import score_requests
from .formats import PreferenceExample, read_dataset
from .options import FORMS, REDUCTIONS, ICAScoringOptions
from .planner import LogProbRequest
from .rendering import AUTO


@dataclass
class ICAScores:
    """ICA scores of a dataset with their parts, all aligned with the dataset's rows.

    Attributes:
        scores (`np.ndarray`): `(N,)` float64, `logp_conditioned - logp_unconditioned` (`form="difference"`) or
            `logp_conditioned` (`form="conditioned"`), divided by `num_tokens` when `reduction="mean"`.
        logp_conditioned (`np.ndarray`): `(N,)` float64, summed log p(y | D, x).
        logp_unconditioned (`np.ndarray`): `(N,)` float64, summed log p(y | x); NaN where it was not computed (the
            conditioned form needs no pass without demonstrations).
        num_tokens (`np.ndarray`): `(N,)` int64, scored response tokens.
        demo_indices (`np.ndarray`): `(N, k)` int64, holdout rows used as demonstrations, in prompt order.
        reduction (`str`): `"sum"` or `"mean"`.
        form (`str`): `"difference"` or `"conditioned"`.
        pair_logps (`np.ndarray`, *optional*): preference pairs only, `(N, 4)` float64: log p(y_w | D, x),
            log p(y_l | D, x), log p(y_w | x), log p(y_l | x). `logp_conditioned` and `logp_unconditioned` then hold
            the chosen-minus-rejected margins and `num_tokens` the chosen and rejected tokens together.
        pair_tokens (`np.ndarray`, *optional*): preference pairs only, `(N, 2)` int64 chosen and rejected tokens.
        token_logps (`list[np.ndarray]`, *optional*): with `per_token=True`, each response's token log-probs with
            the demonstrations (`float32`, `num_tokens[i]` long), whose sums are `logp_conditioned`.
    """

    scores: np.ndarray
    logp_conditioned: np.ndarray
    logp_unconditioned: np.ndarray
    num_tokens: np.ndarray
    demo_indices: np.ndarray
    reduction: str = "sum"
    form: str = "difference"
    pair_logps: np.ndarray | None = None
    pair_tokens: np.ndarray | None = None
    token_logps: list | None = None


def reduce_scores(conditioned, unconditioned, num_tokens, reduction: str, form: str = "difference") -> np.ndarray:
    """`conditioned - unconditioned` (or `conditioned` alone for `form="conditioned"`), per response token when
    `reduction="mean"`."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("form", form, FORMS)
    score = np.asarray(conditioned, dtype=np.float64)
    if form == "difference":
        score = score - np.asarray(unconditioned, dtype=np.float64)
    return score / np.asarray(num_tokens) if reduction == "mean" else score


class ICARequestBuilder:
    """Holds the rendered holdout and builds the requests of candidates; shared by the scoring API and trainers.

    Args:
        tokenizer: the model's tokenizer.
        candidates (`list[SFTExample]` or `list[PreferenceExample]`): the examples (or pairs) to score.
        holdout (`list[SFTExample]`): the clean holdout examples (of a preference holdout, prompt and chosen).
        options ([`ICAScoringOptions`]): what defines the score; the requests are rendered by its [`Renderer`].
            `span="auto"` is decided here for these rows ([`ICAScoringOptions.resolve`]): `options` is then the
            resolved options and `span_reason` says why the whole response is scored where the rows allow no span.
    """

    def __init__(self, tokenizer, candidates, holdout, options: ICAScoringOptions):
        options, self.span_reason = options.resolve(tokenizer, candidates, holdout)
        self.options = options
        self.renderer = options.renderer(tokenizer)
        self.candidates = candidates
        self.holdout = holdout
        self._pending = None  # (choose, max_length, argument) of deferred demonstrations ([`defer`])
        self.pairs = isinstance(candidates[0], PreferenceExample)
        self.width = 2 if self.pairs else 1  # requests per candidate
        if self.renderer.span is not None:
            if self.pairs:
                raise ValueError(
                    "`ica_score_span` scores a span of single responses; preference pairs are scored "
                    "whole (their margin). Leave it unset for pairs."
                )
            lacking = [i for i, h in enumerate(holdout) if self.renderer.span_tokens(h) is None]
            if lacking:
                raise ValueError(
                    f"`ica_score_span`={self.renderer.span!r}: holdout rows {lacking[:5]} ({len(lacking)} of "
                    f"{len(holdout)}) have no such span in their response; every clean holdout response needs one."
                )

    def pair_requests(self, i: int, conditioned: bool) -> list[LogProbRequest]:
        """[chosen, rejected] requests of pair i. Both share demonstrations and prompt: unless the demonstration
        prefix is shared by every pair (fixed demos), the prompt joins the prefix so the pair runs it once."""
        pair = self.candidates[i]
        demos = [self.holdout[j] for j in self.demo_indices[i]] if conditioned else []
        out = []
        for example in (pair.as_sft("chosen"), pair.as_sft("rejected")):
            req = self.renderer.conditioned(example, demos) if conditioned else self.renderer.unconditioned(example)
            if not (conditioned and self._demo_prefix_shared):
                req = LogProbRequest(req.prefix + req.context, (), req.response, req.scored)
            out.append(req)
        return out

    def defer(self, choose, max_length: int | None, argument: str) -> None:
        """Choose the demonstrations (`choose()`, then the length check) at [`choose_demonstrations`] rather than
        now: the trainers defer kNN on the model's own embeddings until training starts, once FSDP or DeepSpeed has
        placed and sharded the model (before that it sits on the CPU, or partitioned)."""
        self._pending = (choose, max_length, argument)

    def choose_demonstrations(self) -> np.ndarray:
        """Choose the deferred demonstrations and check the lengths they give; once chosen (or set), a no-op.
        Returns [`demo_indices`]."""
        if self._pending is not None:
            choose, max_length, argument = self._pending
            self.demo_indices = choose()
            self.check_lengths(max_length, argument)
        return self._demo_indices

    @property
    def demo_indices(self) -> np.ndarray:
        """`(len(candidates), k)` holdout rows of each candidate's demonstrations."""
        if self._pending is not None:
            raise RuntimeError(
                "The demonstrations were deferred ([`ICARequestBuilder.defer`]) and are not chosen yet: call "
                "`choose_demonstrations()` first (the trainers do when training starts)."
            )
        return self._demo_indices

    @demo_indices.setter
    def demo_indices(self, value) -> None:
        self._pending = None
        self._demo_indices = np.asarray(value, dtype=np.int64)
        # Whether every candidate has the same demonstrations (one shared prefix): checked once per assignment, not
        # per request, which made building N pair requests O(N^2)
        self._demo_prefix_shared = len(self._demo_indices) > 1 and bool(
            (self._demo_indices == self._demo_indices[0]).all()
        )

    def requests(self, i: int, conditioned: bool) -> list[LogProbRequest]:
        """The requests of candidate i: one for an example, [chosen, rejected] for a pair."""
        if self.pairs:
            return self.pair_requests(i, conditioned)
        return [self.conditioned(i) if conditioned else self.unconditioned(i)]

    def spanless(self, indices) -> np.ndarray:
        """Under `ica_score_span`: which of the candidates `indices` lack the span in their response (their requests
        score one token only so as to be valid; their score is -inf, below every response that has it). All False
        without a span."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.renderer.span is None or self.pairs:
            return np.zeros(len(indices), dtype=bool)
        return np.array([self.renderer.span_tokens(self.candidates[i]) is None for i in indices.tolist()], dtype=bool)

    def mark_spanless(self, result: ICAScores, indices) -> ICAScores:
        """`result` (the scores of candidates `indices`) with the spanless ones at -inf."""
        missing = self.spanless(indices)
        if missing.any():
            result.scores = np.where(missing, -np.inf, result.scores)
        return result

    def conditioned(self, i: int) -> LogProbRequest:
        return self.renderer.conditioned(self.candidates[i], [self.holdout[j] for j in self.demo_indices[i]])

    def unconditioned(self, i: int) -> LogProbRequest:
        return self.renderer.unconditioned(self.candidates[i])

    def check_lengths(self, max_length: int | None, argument: str = "max_length") -> None:
        """Raise if a conditioned sequence is longer than `max_length`, naming how many and which."""
        if max_length is None:
            return
        lengths = np.array([max(r.num_tokens for r in self.requests(i, True)) for i in range(len(self.candidates))])
        too_long = np.flatnonzero(lengths > max_length)
        if too_long.size:
            raise ValueError(
                f"{too_long.size} of {len(lengths)} examples are longer than `{argument}`={max_length} tokens with "
                f"their demonstrations (rows {too_long[:5].tolist()}, up to {lengths.max()} tokens). Raise "
                f"`{argument}` if the model's context allows it, give fewer demonstrations (`num_demos`; "
                "`ica_num_demos` in a trainer), or use shorter holdout examples."
            )


def resolve_embedder(
    model,
    tokenizer,
    embedding_model: str | Embedder | None,
    show_progress: bool,
    compute_dtype=None,
    distributed: str | None = None,
) -> Embedder:
    """The embedder of kNN demonstrations: the model's own hidden states ([`model_embeddings`], `distributed` as
    there), a sentence-transformers encoder by name, or a callable."""
    if embedding_model is None:
        return lambda texts: model_embeddings(
            model,
            tokenizer,
            texts,
            show_progress=show_progress,
            compute_dtype=compute_dtype,
            distributed=distributed,
        )
    if isinstance(embedding_model, str):
        return sentence_embedder(embedding_model)
    if callable(embedding_model):
        return embedding_model
    raise ValueError(
        f"`embedding_model` must be None (the model's own hidden states), a sentence-transformers name or path, or "
        f"a callable, got {type(embedding_model).__name__}."
    )


def _options(options: ICAScoringOptions | None) -> ICAScoringOptions:
    """`options`, or the recommended ones when None."""
    if options is None:
        return ICAScoringOptions()
    if not isinstance(options, ICAScoringOptions):
        raise ValueError(
            f"`options` must be an ICAScoringOptions (or None for the recommended settings), got "
            f"{type(options).__name__}; `compute_ica_scores` takes the settings as keywords."
        )
    return options


def prepare_ica(
    model,
    tokenizer,
    dataset,
    holdout,
    options: ICAScoringOptions | None = None,
    *,
    max_length: int | None = None,
    max_length_argument: str = "max_length",
    show_progress: bool = True,
    compute_dtype=None,
    defer_demos: bool = False,
) -> ICARequestBuilder:
    """Read and check the data, choose demonstrations and return the [`ICARequestBuilder`]. The score is defined by
    `options` ([`ICAScoringOptions`]; None: the recommended settings).
    `compute_dtype`: the autocast dtype of the model's own kNN embeddings (see [`model_embeddings`]); `defer_demos`:
    choose them when first needed (see [`ICARequestBuilder.defer`])."""
    options = _options(options)
    candidates = read_dataset(dataset, "dataset", tokenizer)
    held = read_holdout(holdout, tokenizer, options.num_demos)
    if max_length is None:
        config = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_length, max_length_argument = config, "the model's max_position_embeddings"
    return _build_requests(
        model,
        tokenizer,
        candidates,
        held,
        options,
        max_length,
        max_length_argument,
        show_progress,
        exclude=holdout_copies(candidates, held, options.num_demos),
        compute_dtype=compute_dtype,
        defer_demos=defer_demos,
    )


def resolve_options(options: ICAScoringOptions, tokenizer, dataset, holdout) -> ICAScoringOptions:
    """`options` with `span="auto"` decided for the rows of `dataset` and `holdout` as [`prepare_ica`] reads them
    ([`ICAScoringOptions.resolve`]), with a warning that says why where every response is scored whole: for a caller
    that records the settings before it scores (`trl-ica score`)."""
    if options.span != AUTO:
        return options
    candidates = read_dataset(dataset, "dataset", tokenizer)
    options, reason = options.resolve(tokenizer, candidates, read_holdout(holdout, tokenizer, options.num_demos))
    if reason is not None:
        warnings.warn(reason, stacklevel=2)
    return options


def read_holdout(holdout, tokenizer, num_demos: int) -> list:
    """The holdout's rows as demonstrations (of a preference holdout, each prompt with its chosen answer), refused
    when it has fewer than `num_demos` rows."""
    held = read_dataset(holdout, "holdout", tokenizer)
    if isinstance(held[0], PreferenceExample):
        held = [h.as_sft("chosen") for h in held]
    if not num_demos <= len(held):
        raise ValueError(f"`num_demos` must be an integer in [1, {len(held)}] (the holdout size), got {num_demos!r}.")
    return held


def holdout_copies(candidates, held, num_demos: int) -> np.ndarray | None:
    """For each candidate, the holdout row that is the same example (same question and response; a pair's chosen
    answer), or -1; None when there is none. Such a row would be its own demonstration and rank first, so it is
    kept out of its own demonstrations (when the holdout has more than `num_demos` rows), with a warning."""
    first = {}
    for j, h in enumerate(held):
        first.setdefault((h.question, h.response), j)
    keys = [(c.question, c.chosen if isinstance(c, PreferenceExample) else c.response) for c in candidates]
    copies = np.array([first.get(key, -1) for key in keys], dtype=np.int64)
    found = np.flatnonzero(copies >= 0)
    if not found.size:
        return None
    listed = f"{found[:5].tolist()}{', ...' if found.size > 5 else ''}"
    excluded = num_demos < len(held)
    warnings.warn(
        f"{found.size} of {len(candidates)} training examples also appear in the holdout (rows {listed}); "
        + (
            "each is kept out of its own demonstrations, but "
            if excluded
            else f"with {num_demos} demonstrations from {len(held)} holdout rows each is its own demonstration, and "
        )
        + "a holdout that overlaps the training set is not a clean measure: remove those rows from the holdout.",
        stacklevel=3,
    )
    if not excluded:
        return None
    return copies


def _build_requests(
    model,
    tokenizer,
    candidates,
    held,
    options: ICAScoringOptions,
    max_length,
    max_length_argument,
    show_progress,
    exclude=None,
    compute_dtype=None,
    defer_demos=False,
) -> ICARequestBuilder:
    """Choose the demonstrations of `candidates` among `held` (`exclude`: see [`select_demos`]) and return the
    length-checked [`ICARequestBuilder`]; shared by [`prepare_ica`] and [`prepare_holdout_reference`]. With
    `defer_demos` the choice and the check wait until the demonstrations are first needed
    ([`ICARequestBuilder.defer`])."""

    def choose() -> np.ndarray:
        embed = None
        if options.demo_selection in NEAREST_SELECTIONS:
            embed = resolve_embedder(model, tokenizer, options.embedding_model, show_progress, compute_dtype)
        return select_demos(
            [c.question for c in candidates],
            [h.question for h in held],
            options.num_demos,
            options.demo_selection,
            options.seed,
            embed,
            exclude,
        )

    builder = ICARequestBuilder(tokenizer, candidates, held, options)
    if builder.span_reason is not None:
        warnings.warn(builder.span_reason, stacklevel=3)
    builder.defer(choose, max_length, max_length_argument)
    if not defer_demos:
        builder.choose_demonstrations()
    return builder


def prepare_holdout_reference(
    model,
    tokenizer,
    holdout,
    options: ICAScoringOptions | None = None,
    *,
    pairs: bool,
    max_length: int | None = None,
    max_length_argument: str = "max_length",
    show_progress: bool = True,
    compute_dtype=None,
    defer_demos: bool = False,
) -> ICARequestBuilder:
    """Requests that score every holdout row as a candidate, its demonstrations chosen as for the training rows but
    from the rest of the holdout (a row never sees itself): the scores clean, on-target examples get, which
    `weighting="holdout_quantile"` weights the training rows against. `pairs` scores the holdout's pairs (a
    preference holdout is then required); otherwise each holdout row (or pair's prompt with its chosen answer).
    `options` as in [`prepare_ica`]."""
    options = _options(options)
    num_demos = options.num_demos
    held = read_dataset(holdout, "holdout", tokenizer)
    held_pairs = isinstance(held[0], PreferenceExample)
    if pairs and not held_pairs:
        raise ValueError(
            "`ica_weighting='holdout_quantile'` weights preference pairs against the holdout's own pair scores, so "
            "the holdout needs `chosen` and `rejected` answers; this one has single responses. Give a preference "
            "holdout, or use another `ica_weighting`."
        )
    demos_pool = [h.as_sft("chosen") for h in held] if held_pairs else held
    candidates = held if pairs else demos_pool
    if not isinstance(num_demos, int) or not 1 <= num_demos < len(held):
        raise ValueError(
            f"`ica_weighting='holdout_quantile'` scores each holdout row with `num_demos`={num_demos!r} "
            f"demonstrations taken from the other holdout rows, so the holdout needs more than {num_demos} rows; it "
            f"has {len(held)}. Give a larger holdout or fewer demonstrations."
        )
    return _build_requests(
        model,
        tokenizer,
        candidates,
        demos_pool,
        options,
        max_length,
        max_length_argument,
        show_progress,
        exclude=np.arange(len(held)),
        compute_dtype=compute_dtype,
        defer_demos=defer_demos,
    )


def score_with(
    model,
    builder: ICARequestBuilder,
    indices=None,
    *,
    batch_size=None,
    show_progress=True,
    distributed: str | None = None,
    max_batch_tokens=None,
    compute_dtype=None,
    per_token: bool = False,
    sharing: str = "auto",
    forward_overhead=None,
) -> ICAScores:
    """Score `indices` (default: all) of a builder's candidates (or pairs) by the builder's options: the pass with
    demonstrations, and for `form="difference"` the pass without. `batch_size`, `max_batch_tokens`, `distributed`,
    `compute_dtype`, `sharing` and `forward_overhead` go to [`score_requests`]; `per_token` keeps the pass with
    demonstrations' token log-probs (`token_logps`, examples only)."""
    if per_token and builder.pairs:
        raise ValueError("`per_token` keeps the token log-probs of single responses; preference pairs have two.")
    form, reduction = builder.options.form, builder.options.reduction
    indices = list(range(len(builder.candidates))) if indices is None else list(indices)
    passes = []
    for conditioned in (True, False) if form == "difference" else (True,):
        label = "with" if conditioned else "without"
        requests = [r for i in indices for r in builder.requests(i, conditioned)]
        out = score_requests(
            model,
            requests,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            show_progress=show_progress,
            desc=f"ICA scoring ({label} demonstrations)",
            distributed=distributed,
            compute_dtype=compute_dtype,
            per_token=per_token and conditioned,
            sharing=sharing,
            forward_overhead=forward_overhead,
        )
        if conditioned:
            token_logps = out.tokens
        passes.append((out.sums.reshape(-1, builder.width), out.counts.reshape(-1, builder.width)))
    (cond, counts), plain = passes[0], (passes[1][0] if len(passes) > 1 else None)
    result = assemble_scores(cond, plain, counts, builder.demo_indices[indices], reduction, form, rows=indices)
    result.token_logps = token_logps
    return builder.mark_spanless(result, indices)


def assemble_scores(
    cond, plain, counts, demo_indices, reduction: str, form: str = "difference", rows=None
) -> ICAScores:
    """[`ICAScores`] from summed log-probs with (`cond`) and without (`plain`) demonstrations, each `(N, 1)` for
    examples or `(N, 2)` [chosen, rejected] for pairs, and the response tokens `counts` of the same shape.
    `plain` may be None (or hold NaN) for `form="conditioned"`, which does not use it. `rows` names the rows in
    errors (default: their positions)."""
    check_choice("form", form, FORMS)
    cond, counts = np.asarray(cond, dtype=np.float64), np.asarray(counts)
    plain = np.full(cond.shape, np.nan) if plain is None else np.asarray(plain, dtype=np.float64)
    passes = [("with demonstrations", cond)] + ([("without demonstrations", plain)] if form == "difference" else [])
    for label, values in passes:
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            raise ValueError(
                f"The model's log-probabilities {label} are not finite for {bad.size} rows "
                f"({(bad if rows is None else np.asarray(rows)[bad])[:5].tolist()}): "
                "the model produced NaN or inf, often a half-precision overflow. Score in float32 or bfloat16, or "
                "check those rows and the model."
            )
    if cond.shape[1] == 1:
        return ICAScores(
            scores=reduce_scores(cond[:, 0], plain[:, 0], counts[:, 0], reduction, form),
            logp_conditioned=cond[:, 0],
            logp_unconditioned=plain[:, 0],
            num_tokens=counts[:, 0],
            demo_indices=demo_indices,
            reduction=reduction,
            form=form,
        )
    # s = [log p(y_w | D, x) - log p(y_l | D, x)] - [log p(y_w | x) - log p(y_l | x)], each term per token for "mean";
    # the conditioned form keeps the first bracket
    per = counts if reduction == "mean" else np.ones_like(counts)
    margin_cond = cond[:, 0] / per[:, 0] - cond[:, 1] / per[:, 1]
    margin_plain = plain[:, 0] / per[:, 0] - plain[:, 1] / per[:, 1]
    return ICAScores(
        scores=margin_cond - margin_plain if form == "difference" else margin_cond,
        logp_conditioned=cond[:, 0] - cond[:, 1],
        logp_unconditioned=plain[:, 0] - plain[:, 1],
        num_tokens=counts.sum(1),
        demo_indices=demo_indices,
        reduction=reduction,
        form=form,
        pair_logps=np.concatenate([cond, plain], axis=1),
        pair_tokens=counts,
    )


def score_ica(
    model,
    tokenizer,
    dataset,
    holdout,
    options: ICAScoringOptions | None = None,
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    show_progress: bool = True,
    distributed: str | None = None,
    max_batch_tokens: int | None = None,
    sharing: str = "auto",
    forward_overhead=None,
) -> ICAScores:
    """ICA scores of every row of `dataset` with their parts. `options` ([`ICAScoringOptions`]) defines the score;
    None gives the recommended settings, the trainers' defaults (`ICAScoringOptions.from_preset("paper")` the
    paper's). The other arguments say how to run it; see [`compute_ica_scores`], which takes the settings as
    keywords."""
    if isinstance(model, str):  # a scoring model by name: loaded with its own tokenizer, on the accelerator if any
        from .scorer import load_scoring_model

        device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        scorer = load_scoring_model(model, tokenizer, device=device, argument="model")
        model, tokenizer = scorer.model, scorer.tokenizer
    options = _options(options)
    builder = prepare_ica(
        model, tokenizer, dataset, holdout, options, max_length=max_length, show_progress=show_progress
    )
    return score_with(
        model,
        builder,
        batch_size=batch_size,
        show_progress=show_progress,
        distributed=distributed,
        max_batch_tokens=max_batch_tokens,
        sharing=sharing,
        forward_overhead=forward_overhead,
    )


def compute_ica_scores(model, tokenizer, dataset, holdout, **kwargs) -> np.ndarray:
    """ICA score of every row of `dataset` under `model`: by default the recommended score, log p(y | k holdout
    demos, x) per response token; with `form="difference", reduction="sum"` the paper's, that minus log p(y | x).
    The one keyword form of the settings: each is a field of [`ICAScoringOptions`], checked there.

    Args:
        model (`PreTrainedModel`, `PeftModel` or `str`): the model that scores: the one being trained, or another
            (a scoring model of its own; the tokenizers need not match the trained model's). LoRA, 4-bit and
            accelerate-wrapped models work; a Hub id or folder is loaded in its checkpoint's dtype, with its
            tokenizer unless `tokenizer` is given.
        tokenizer: its tokenizer (None with a model name).
        dataset (`datasets.Dataset` or `list[dict]`): candidates in a TRL format: prompt/completion (standard or
            conversational) or `messages` (the last turn is scored); or preference pairs (`chosen` and
            `rejected`, explicit or implicit prompt), scored by the change of the chosen-minus-rejected margin.
        holdout: clean examples in the same format, used as demonstrations.
        num_demos (`int`, *optional*, defaults to `3`): k demonstrations per candidate.
        demo_selection (`str`, *optional*, defaults to `"knn"`): `"knn"`, `"fixed"` or `"random"` (see
            [`select_demos`]).
        reduction (`str`, *optional*, defaults to `"mean"`): `"sum"` over response tokens, or `"mean"` per token.
        form (`str`, *optional*, defaults to `"conditioned"`): `"difference"`, the paper's score above; or
            `"conditioned"`, log p(y | D, x) alone (for pairs the chosen-minus-rejected margin with demonstrations),
            which skips the pass without demonstrations. The difference finds examples off the holdout's
            distribution; the conditioned form (best with `reduction="mean"`) also finds responses that do not fit
            their own prompt (wrong or mismatched labels). See docs/scores.md, "Which score to trust".
        batch_size (`int`, *optional*): most sequences per forward (token-budgeted by default).
        max_batch_tokens (`int`, *optional*): token positions per forward, counting for each sequence the shared
            demonstration prefix it attends to and its own tokens; 16384 on an accelerator, 2048 on the CPU.
        sharing (`str`, *optional*, defaults to `"auto"`): how demonstration prefixes share their KV cache:
            `"tree"`, `"flat"`, `"none"`, or `"auto"` (the cheapest by the cost model); see [`score_requests`].
        forward_overhead (`float` or `"measure"`, *optional*): the cost model's fixed cost per forward, in tokens
            (default 32 on the CPU, 256 on an accelerator, 1024 there where each forward gathers or dequantises every
            weight: QLoRA, ZeRO-3, FSDP), or `"measure"` it. See [`score_requests`].
        template ([`ICAPromptTemplate`], *optional*): the demonstration wording.
        chat_template (`str`, *optional*): overrides the tokenizer's chat template.
        layout (`str`, *optional*, defaults to `"turns"`): for conversational rows, `"turns"` (each demonstration an
            earlier user/assistant exchange before the row's unchanged turn) or `"in_turn"` (the demonstrations and
            the question in one user turn, with the paper's wording or `template`). See [`Renderer`].
        score_end (`bool`, *optional*, defaults to `True`): score the end-of-turn (or EOS) token after each
            response, as TRL trains it.
        embedding_model (`str` or callable, *optional*): for kNN, a sentence-transformers encoder instead of the
            model's own mean-pooled hidden states.
        seed (`int`, *optional*, defaults to `0`): seed of fixed and random demonstrations.
        span (`str`, *optional*): score only a span of each response, the rest as context: `"last_line"`, a regular
            expression whose last match is the span, or `"auto"` (the last line where every row allows a span, the
            whole response otherwise, with a warning); None or `"response"`: the whole response. See
            [`ICAScoringOptions`].
        max_length (`int`, *optional*): longest allowed conditioned sequence; defaults to the model's context size.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.
        distributed (`str`, *optional*): under `accelerate launch` (or `torchrun`) with several processes, every
            process calls this function and the rows are split between them (`"shard"`, the default there); each
            process gets every score. `"local"` scores everything on the calling process alone. See
            [`score_requests`].

    Returns:
        `np.ndarray`: `(len(dataset),)` float64 scores aligned with the rows. [`score_ica`] returns the parts too.

    Example:

    ```python
    >>> from trl_ica import compute_ica_scores
    >>> scores = compute_ica_scores(model, tokenizer, train_dataset, holdout_dataset, num_demos=3)
    ```
    """
    fields = {f.name for f in dataclasses.fields(ICAScoringOptions)}
    running = set(inspect.signature(score_ica).parameters) - {"model", "tokenizer", "dataset", "holdout", "options"}
    unknown = sorted(set(kwargs) - fields - running)
    if unknown:
        raise ValueError(
            f"`compute_ica_scores` got unknown settings {unknown}; it takes the fields of "
            f"ICAScoringOptions {sorted(fields)} and {sorted(running)}."
        )
    options = ICAScoringOptions(**{k: v for k, v in kwargs.items() if k in fields})
    run = {k: v for k, v in kwargs.items() if k not in fields}
    return score_ica(model, tokenizer, dataset, holdout, options, **run).scores
