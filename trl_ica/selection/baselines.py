"""Training-free data scores behind one interface: ICA and the baselines people compare it with.

Every method returns one float64 score per dataset row, aligned with the rows; a larger score means a more valuable
example (keep the top), except where a method's entry below says otherwise.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from ..scoring.demonstrations import check_choice, select_demos
from ..scoring.engine import score_requests
from ..scoring.formats import PreferenceExample, SFTExample, read_dataset
from ..scoring.ica import resolve_embedder, score_ica
from ..scoring.options import ICAScoringOptions
from ..scoring.planner import LogProbRequest
from ..scoring.rendering import AUTO, Renderer
from .whisperer import WhispererConfig, whisperer_scores

#: Method name -> what its score is. Larger is better for all of them except `ifd`, where the IFD paper keeps the
#: examples with the *highest* ratio (the responses the instruction helps least), so larger is "selected" too.
METHODS = {
    "ica": "log p(y | k holdout demos, x) - log p(y | x); for pairs, the change of the chosen-minus-rejected margin "
    "(form='conditioned': log p(y | k holdout demos, x) alone, or the margin with demos)",
    "whisperer": "Data Whisperer: few-shot answer quality credited to each demonstration by its attention share",
    "oneshot": "mean gain of its nearest holdout answers' log-probability with the example as the one demonstration",
    "rho": "RHO-Loss: loss under the current model minus loss under a reference model trained on the holdout",
    "loss": "log p(y | x) per response token (higher: the model already finds it likely); for pairs the margin",
    "ifd": "IFD = ppl(y | x) / ppl(y), per token (high: the prompt helps little to predict the response)",
    "random": "uniform random, seeded",
}


def _requests_per_row(renderer: Renderer, examples, fn) -> tuple[list[LogProbRequest], int]:
    """Requests of `fn(example)` for every example; pairs give [chosen, rejected]."""
    if isinstance(examples[0], PreferenceExample):
        return [fn(e.as_sft(which)) for e in examples for which in ("chosen", "rejected")], 2
    return [fn(e) for e in examples], 1


def _per_token(model, requests, width, batch_size, show_progress, desc, max_batch_tokens=None):
    out = score_requests(
        model,
        requests,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        show_progress=show_progress,
        desc=desc,
    )
    return out.sums.reshape(-1, width), out.counts.reshape(-1, width)


def loss_scores(
    model, tokenizer, dataset, *, batch_size=None, show_progress=True, max_batch_tokens=None
) -> np.ndarray:
    """Mean log p(y | x) per response token; for pairs, log p(y_w | x) - log p(y_l | x) per token."""
    examples = read_dataset(dataset, "dataset")
    renderer = Renderer(tokenizer)
    requests, width = _requests_per_row(renderer, examples, renderer.unconditioned)
    sums, counts = _per_token(model, requests, width, batch_size, show_progress, "log p(y | x)", max_batch_tokens)
    mean = sums / counts
    return mean[:, 0] if width == 1 else mean[:, 0] - mean[:, 1]


def _response_alone(renderer: Renderer, example: SFTExample) -> LogProbRequest:
    """log p(y) for IFD: the response after an empty user turn (chat data) or after BOS alone (plain text; EOS when
    the tokenizer puts nothing before text)."""
    if example.conversational:
        return renderer.unconditioned(dataclasses.replace(example, question=""))
    start = renderer.bos or (renderer.tokenizer.eos_token_id,)
    plain = renderer.unconditioned(example)
    return LogProbRequest(start, (), plain.response, plain.scored)


def ifd_scores(model, tokenizer, dataset, *, batch_size=None, show_progress=True, max_batch_tokens=None) -> np.ndarray:
    """Instruction-Following Difficulty, ppl(y | x) / ppl(y) (per-token perplexities), of SFT examples."""
    examples = read_dataset(dataset, "dataset")
    if isinstance(examples[0], PreferenceExample):
        raise ValueError("`method='ifd'` is defined for SFT examples, not for preference pairs.")
    renderer = Renderer(tokenizer)
    plain, counts = _per_token(
        model,
        [renderer.unconditioned(e) for e in examples],
        1,
        batch_size,
        show_progress,
        "log p(y | x)",
        max_batch_tokens,
    )
    alone, _ = _per_token(
        model,
        [_response_alone(renderer, e) for e in examples],
        1,
        batch_size,
        show_progress,
        "log p(y)",
        max_batch_tokens,
    )
    return np.exp((alone[:, 0] - plain[:, 0]) / counts[:, 0])


def rho_scores(
    model, tokenizer, dataset, reference_model, *, batch_size=None, show_progress=True, max_batch_tokens=None
) -> np.ndarray:
    """RHO-Loss, the reducible holdout loss: per-token loss under `model` minus under `reference_model` (trained on
    the holdout). High: the model has not learnt it yet but it is learnable and consistent with the holdout."""
    if reference_model is None:
        raise ValueError(
            "`method='rho'` needs `reference_model`: a model fine-tuned on the holdout set (e.g. with SFTTrainer)."
        )
    if isinstance(read_dataset(dataset, "dataset")[0], PreferenceExample):
        raise ValueError("`method='rho'` is defined for SFT examples, not for preference pairs.")
    common = dict(batch_size=batch_size, show_progress=show_progress, max_batch_tokens=max_batch_tokens)
    current = loss_scores(model, tokenizer, dataset, **common)
    reference = loss_scores(reference_model, tokenizer, dataset, **common)
    return reference - current  # = loss(current) - loss(reference), since loss_scores are log-probabilities


def oneshot_scores(
    model,
    tokenizer,
    dataset,
    holdout,
    *,
    num_queries: int = 3,
    embedding_model=None,
    batch_size=None,
    show_progress=True,
    max_batch_tokens=None,
) -> np.ndarray:
    """One-Shot (Nuggets-style): each example as the single demonstration in front of its `num_queries` nearest
    holdout examples; its score is the mean gain of their answers' log-probability (for a preference holdout, of
    their chosen-minus-rejected margin). Each example's demonstration prefix runs once for all its queries."""
    examples = read_dataset(dataset, "dataset", tokenizer)
    held = read_dataset(holdout, "holdout", tokenizer)
    if not isinstance(num_queries, int) or not 1 <= num_queries <= len(held):
        raise ValueError(
            f"`num_queries` must be an integer in [1, {len(held)}] (the holdout size), got {num_queries}."
        )
    as_demo = [e.as_sft("chosen") if isinstance(e, PreferenceExample) else e for e in examples]
    pairs = isinstance(held[0], PreferenceExample)
    targets = [[h.as_sft("chosen"), h.as_sft("rejected")] if pairs else [h] for h in held]
    embed = resolve_embedder(model, tokenizer, embedding_model, show_progress)
    # The nearest holdout examples of each candidate: kNN from the holdout's side
    nearest = select_demos([e.question for e in examples], [h.question for h in held], num_queries, "knn", 0, embed)
    renderer = Renderer(tokenizer)
    requests = [
        renderer.conditioned(t, [as_demo[i]]) for i in range(len(examples)) for j in nearest[i] for t in targets[j]
    ]
    with_demo = score_requests(
        model,
        requests,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        show_progress=show_progress,
        desc="One-Shot (with the example)",
    ).sums.reshape(len(examples), num_queries, -1)
    base = score_requests(
        model,
        [renderer.unconditioned(t) for ts in targets for t in ts],
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        show_progress=show_progress,
        desc="One-Shot (holdout alone)",
    ).sums.reshape(len(held), -1)
    gain = with_demo - base[nearest]  # (N, q, 1 or 2)
    if pairs:
        gain = gain[..., 0] - gain[..., 1]
    else:
        gain = gain[..., 0]
    return gain.mean(1)


def random_scores(dataset, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(len(read_dataset(dataset, "dataset")))


def score_dataset(
    method: str,
    model,
    tokenizer,
    dataset,
    holdout=None,
    options: ICAScoringOptions | None = None,
    *,
    reference_model=None,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    sharing: str = "auto",
    forward_overhead=None,
    whisperer: WhispererConfig | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Score every row of `dataset` with `method` (one of [`METHODS`]); float64, aligned with the rows.

    Args:
        method (`str`): `"ica"`, `"whisperer"`, `"oneshot"`, `"rho"`, `"loss"`, `"ifd"` or `"random"`.
        model, tokenizer: the model to score with (the one to be fine-tuned, or a smaller one of its family).
        dataset: rows in a TRL format (SFT or preference; `ifd` and `rho` take SFT rows).
        holdout: clean examples, needed by `ica` and `oneshot`; for `whisperer`, optional: the questions to answer.
        reference_model: for `rho`, a model fine-tuned on the holdout set.
        options ([`ICAScoringOptions`], *optional*): the ICA score of `ica` (None: the recommended settings); the
            other methods read from it what they share with ICA: `num_demos` (`oneshot`'s holdout queries per
            example), `embedding_model` (`oneshot`'s nearest holdout rows) and `seed` (`random`).
        whisperer ([`WhispererConfig`]): settings of `whisperer` (default: its defaults with `seed`/`batch_size`).
        max_batch_tokens (`int`, *optional*): the scoring token budget of the log-probability methods (see
            [`score_requests`]).
        sharing, forward_overhead: how `ica` shares demonstration prefixes, and the cost model's fixed cost per
            forward (see [`compute_ica_scores`]).
    """
    check_choice("method", method, list(METHODS))
    if options is not None and not isinstance(options, ICAScoringOptions):
        raise ValueError(f"`options` must be an ICAScoringOptions or None, got {type(options).__name__}.")
    options = options or ICAScoringOptions()
    if options.span not in (None, AUTO) and method != "ica":
        raise ValueError(f"`options.span` ({options.span!r}) applies to `method='ica'` only, got {method!r}.")
    if (sharing != "auto" or forward_overhead is not None) and method != "ica":
        raise ValueError(
            f"`sharing` ({sharing!r}) and `forward_overhead` ({forward_overhead!r}) choose how `ica` "
            f"shares demonstration prefixes; `method={method!r}` has none."
        )
    if method in ("ica", "oneshot") and holdout is None:
        raise ValueError(f"`method={method!r}` needs a holdout set (`holdout`).")
    common = dict(batch_size=batch_size, show_progress=show_progress, max_batch_tokens=max_batch_tokens)
    if method == "whisperer":
        config = whisperer or WhispererConfig(seed=options.seed, **({"batch_size": batch_size} if batch_size else {}))
        return whisperer_scores(model, tokenizer, dataset, holdout, config, show_progress=show_progress).scores
    if method == "ica":
        return score_ica(
            model,
            tokenizer,
            dataset,
            holdout,
            options,
            sharing=sharing,
            forward_overhead=forward_overhead,
            **common,
        ).scores
    if method == "oneshot":
        return oneshot_scores(
            model,
            tokenizer,
            dataset,
            holdout,
            num_queries=options.num_demos,
            embedding_model=options.embedding_model,
            **common,
        )
    if method == "rho":
        return rho_scores(model, tokenizer, dataset, reference_model, **common)
    if method == "loss":
        return loss_scores(model, tokenizer, dataset, **common)
    if method == "ifd":
        return ifd_scores(model, tokenizer, dataset, **common)
    return random_scores(dataset, options.seed)


SELECT_MODES = ("top", "bottom", "threshold")


def select_top(scores, ratio: float | None = None, *, mode: str = "top", threshold: float | None = None) -> np.ndarray:
    """Row indices to keep, in dataset order: the `ratio` share with the highest (`"top"`) or lowest (`"bottom"`)
    scores, or (`"threshold"`) every row scoring at least `threshold`. Ties are broken by row order, so the choice
    is deterministic; NaN scores are an error."""
    check_choice("mode", mode, SELECT_MODES)
    try:
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        example = next((s for s in scores if not isinstance(s, (int, float))), None)
        raise ValueError(f"`scores` must be numbers; found {example!r} ({type(example).__name__}).") from error
    if scores.size == 0:
        raise ValueError("`scores` is empty: there is nothing to select from.")
    bad = np.flatnonzero(np.isnan(scores))
    if bad.size:
        raise ValueError(f"{bad.size} scores are NaN (rows {bad[:5].tolist()}); rescore or drop them explicitly.")
    if mode == "threshold":
        if threshold is None:
            raise ValueError("`mode='threshold'` needs `threshold`.")
        if not isinstance(threshold, numbers.Real) or np.isnan(threshold):
            raise ValueError(f"`threshold` must be a number, got {threshold!r}.")
        keep = np.flatnonzero(scores >= threshold)
        if not keep.size:
            raise ValueError(
                f"No row scores at least `threshold`={threshold} (the scores run from {scores.min():.4g} to "
                f"{scores.max():.4g}); lower it, or use a `ratio`."
            )
        return keep
    if ratio is None or not 0 < ratio <= 1:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}.")
    keep = max(1, int(np.floor(ratio * scores.size)))
    order = np.argsort(-scores if mode == "top" else scores, kind="stable")
    return np.sort(order[:keep])
