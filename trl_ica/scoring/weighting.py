"""From ICA scores to per-example loss weights.

Conventions, the same for every scheme:

- Equal scores (or a batch of one) carry no ranking information: every weight is 1.
- `+inf` is treated as the largest finite score of the group and `-inf` as the smallest (weights 1 and 0 under
  min-max); a group with no finite score gets weight 1 for all.
- NaN is an error that names the rows: a NaN score means the scoring itself broke (an fp16 overflow, say), and no
  weight would be an honest answer for it.
"""

from __future__ import annotations

import numpy as np

WEIGHTINGS = ("batch_minmax", "global_minmax", "holdout_quantile", "holdout_posterior", "none")
#: Schemes whose weights depend only on the scores of one batch.
BATCH_WEIGHTINGS = ("batch_minmax",)
#: Schemes that compare a score with every score of the training set (not known online, row by row).
POOL_WEIGHTINGS = ("holdout_posterior",)


def _clean(scores, where: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(s).any():
        raise ValueError(f"ICA scores of {where} {np.flatnonzero(np.isnan(s)).tolist()} are NaN; cannot weight them.")
    finite = np.isfinite(s)
    if finite.any() and not finite.all():
        s = np.where(s == np.inf, s[finite].max(), np.where(s == -np.inf, s[finite].min(), s))
    elif not finite.any():
        s = np.zeros_like(s)
    return s


def minmax_weights(scores, low: float | None = None, high: float | None = None, where: str = "rows") -> np.ndarray:
    """(s - low) / (high - low) clipped to [0, 1]; `low`/`high` default to the scores' own min and max."""
    s = _clean(scores, where)
    if s.size == 0:
        return s
    low = s.min() if low is None else low
    high = s.max() if high is None else high
    if not high - low > 1e-12 * max(1.0, abs(high), abs(low)):
        return np.ones_like(s)
    return np.clip((s - low) / (high - low), 0.0, 1.0)


def quantile_weights(scores, reference, cutoff: float = 1.0, where: str = "rows") -> np.ndarray:
    """The share of `reference` scores below each score, ties counting half, divided by `cutoff` and capped at 1:
    in [0, 1], 0 below every reference score. With `cutoff=1` a score equal to the reference median gets 0.5 and
    one above every reference score 1; with `cutoff=0.1` every score at or above the reference's lowest tenth gets
    1. The weight of a row depends only on its own score and the reference, never on the rows that share its batch.

    Args:
        scores (`array-like`): the scores to weight.
        reference (`array-like`): the scores that clean, on-target examples get (the holdout's own, each holdout row
            scored with demonstrations drawn from the rest of the holdout); at least one, none NaN.
        cutoff (`float`, *optional*, defaults to `1.0`): the share of `reference` a score must beat for full weight,
            in (0, 1].
    """
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff <= 1:
        raise ValueError(f"`cutoff` (`ica_holdout_cutoff`) must be a number in (0, 1], got {cutoff!r}.")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(s).any():
        raise ValueError(f"ICA scores of {where} {np.flatnonzero(np.isnan(s)).tolist()} are NaN; cannot weight them.")
    ref = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    if ref.size == 0:
        raise ValueError("`weighting='holdout_quantile'` needs the holdout's own scores; none were given.")
    if np.isnan(ref).any():
        raise ValueError(
            f"The holdout's own ICA scores (rows {np.flatnonzero(np.isnan(reference)).tolist()}) are NaN; "
            "cannot weight against them."
        )
    below = np.searchsorted(ref, s, side="left")
    at_or_below = np.searchsorted(ref, s, side="right")
    return np.minimum((below + at_or_below) / (2.0 * ref.size * cutoff), 1.0)


def _isotonic(values: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in squared error (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(c), t / c) for t, c in blocks]) if blocks else np.zeros(0)


#: Points at which `holdout_posterior` evaluates the two score densities (then interpolated to each score).
GRID_POINTS = 1024


def holdout_share(pool, reference, quantile: float = 0.5) -> float:
    """The share pi of the training set that scores like the holdout, estimated from the upper tail: rows unlike the
    holdout score below it (what the scores are for), so above the holdout's `quantile` the training set holds
    pi * (1 - quantile) of its rows from the holdout-like part and almost nothing else:
    pi = P_pool(s >= t) / P_holdout(s >= t) at t = that quantile, capped at 1. Other rows scoring above t make it an
    overestimate (the weights then err towards keeping rows)."""
    pool = np.asarray(pool, dtype=np.float64).reshape(-1)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    threshold = np.quantile(ref, quantile)
    above_ref = np.mean(ref >= threshold)
    return float(min(1.0, np.mean(pool >= threshold) / above_ref)) if above_ref > 0 else 1.0


def posterior_weights(scores, reference, pool, where: str = "rows") -> np.ndarray:
    """The probability that a row is holdout-like given its score, up to the holdout's median: the training set's
    scores `pool` are read as a mixture, pi * f_holdout + (1 - pi) * f_other, with f_holdout the density of the
    holdout's own scores (`reference`), so P(holdout-like | s) = pi * f_holdout(s) / f_pool(s). Rows unlike the holdout
    score below it, so a row at the holdout's median score is taken as holdout-like: the weight is the ratio
    f_holdout / f_pool at the row's score over its value at that median, capped at 1, which is the posterior wherever
    no other rows reach the median (pi = f_pool / f_holdout there: [`holdout_share`] estimates it from the tail).
    Both densities are Gaussian kernel estimates with one bandwidth (Silverman's rule on the holdout's scores), and the
    ratio, bounded by 1 / pi as the mixture bounds it (f_pool >= pi * f_holdout), is made non-decreasing in the score
    (a higher score is never less holdout-like). Rows that score like the holdout keep weight 1 and rows below it fall
    to 0, where `holdout_quantile` spreads clean rows over [0, 1]; a pool without other rows keeps every weight near
    1. Normalising at the median rather than by the estimated pi keeps the holdout's own sampling noise (its median
    moves by ~1.25 sd / sqrt(n)) from scaling every weight down.

    Args:
        scores (`array-like`): the scores to weight (rows of `pool`, or others).
        reference (`array-like`): the holdout's own scores, at least 2 and not all equal.
        pool (`array-like`): every training row's score, the mixture the holdout is compared with (its -inf
            scores, rows without a scored span, are left out of it).
    A score of -inf gets weight 0 and +inf weight 1.
    """
    raw = np.asarray(scores, dtype=np.float64).reshape(-1)
    s = _clean(raw, where)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    pool = np.asarray(pool, dtype=np.float64).reshape(-1)
    pool = pool[np.isfinite(pool)]  # -inf: rows that lack what is scored (`ica_score_span`), weighted 0 below
    for name, values in (("holdout's own", ref), ("training set's", pool)):
        if values.size < 2 or not np.isfinite(values).all():
            raise ValueError(
                f"`weighting='holdout_posterior'` needs at least 2 finite {name} scores, got "
                f"{values.size} ({int((~np.isfinite(values)).sum())} not finite)."
            )
    spread = min(ref.std(ddof=1), (np.quantile(ref, 0.75) - np.quantile(ref, 0.25)) / 1.349) or ref.std(ddof=1)
    if not spread > 0:
        raise ValueError(
            "`weighting='holdout_posterior'`: the holdout's own scores are all equal, so they give no "
            "density to compare with."
        )
    bandwidth = 0.9 * spread * ref.size ** (-0.2)

    def density(at, sample):  # in blocks of the grid: memory of 64 x len(sample) at most
        out = np.empty(len(at))
        for start in range(0, len(at), 64):
            z = (at[start : start + 64, None] - sample[None, :]) / bandwidth
            out[start : start + 64] = np.exp(-0.5 * z * z).mean(axis=1)
        return out

    median = float(np.median(ref))
    # a fixed grid (the densities are smooth at the bandwidth's scale) rather than every score: linear in the rows
    low, high = min(pool.min(), s.min(), median), max(pool.max(), s.max(), median)
    grid = np.unique(np.concatenate([np.linspace(low, high, GRID_POINTS), [median]]))
    # the mixture bounds the ratio: f_pool >= pi * f_holdout. Beside a holdout score where no training row lies (a
    # heavy-tailed holdout, a narrow bandwidth) the kernel estimate of f_pool falls to ~0 and the raw ratio grows
    # without bound; made non-decreasing, that spike would lift every weight above it to 1
    ceiling = 1.0 / max(holdout_share(pool, ref), 1.0 / pool.size)
    curve = _isotonic(np.minimum(density(grid, ref) / np.maximum(density(grid, pool), 1e-300), ceiling))
    at_median = curve[np.searchsorted(grid, median)]
    weights = np.interp(s, grid, np.minimum(curve / at_median, 1.0))
    return np.where(raw == -np.inf, 0.0, np.where(raw == np.inf, 1.0, weights))


def compute_weights(
    scores,
    scheme: str = "batch_minmax",
    *,
    global_range: tuple[float, float] | None = None,
    reference=None,
    cutoff: float = 1.0,
    pool=None,
    where: str = "rows",
) -> np.ndarray:
    """Per-example weights (float64) of one batch of `scores`.

    Args:
        scores (`array-like`): the batch's scores.
        scheme (`str`, *optional*, defaults to `"batch_minmax"`):
            `"batch_minmax"` (the paper's): min-max within the batch, in [0, 1].
            `"global_minmax"`: min-max against `global_range`, the (min, max) over the whole scored dataset.
            `"holdout_quantile"`: where each score falls among `reference`, the holdout's own scores
            ([`quantile_weights`]), at full weight from the `cutoff` share of them up.
            `"holdout_posterior"`: the probability that a row is holdout-like given its score, with the training set's
            scores `pool` read as a mixture of holdout-like rows and others ([`posterior_weights`]).
            `"none"`: all 1 (scores are only logged).
        global_range (`tuple[float, float]`, *optional*): required for `"global_minmax"`.
        reference (`array-like`, *optional*): required for `"holdout_quantile"`.
        cutoff (`float`, *optional*, defaults to `1.0`): for `"holdout_quantile"`.
        pool (`array-like`, *optional*): every training row's score, required for `"holdout_posterior"`.
        where (`str`): how errors name the rows.
    """
    if scheme not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {list(WEIGHTINGS)}, got {scheme!r}.")
    if scheme == "batch_minmax":
        return minmax_weights(scores, where=where)
    if scheme == "global_minmax":
        if global_range is None:
            raise ValueError("`weighting='global_minmax'` needs the dataset's score range (`global_range`).")
        return minmax_weights(scores, *global_range, where=where)
    if scheme == "holdout_quantile":
        if reference is None:
            raise ValueError("`weighting='holdout_quantile'` needs the holdout's own scores (`reference`).")
        return quantile_weights(scores, reference, cutoff, where=where)
    if scheme == "holdout_posterior":
        _clean(scores, where)  # NaN names its rows first
        if reference is None or pool is None:
            raise ValueError(
                "`weighting='holdout_posterior'` needs the holdout's own scores (`reference`) and every "
                "training row's (`pool`)."
            )
        return posterior_weights(scores, reference, pool, where=where)
    _clean(scores, where)  # NaN is still an error under "none"
    return np.ones(np.asarray(scores).size, dtype=np.float64)


def score_range(scores) -> tuple[float, float]:
    """(min, max) of the finite scores, for `"global_minmax"`."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    return (float(s.min()), float(s.max())) if s.size else (0.0, 0.0)


def check_token_quantile(quantile) -> None:
    """`ica_token_quantile` is None or a number in (0, 1)."""
    if quantile is None:
        return
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
        raise ValueError(f"`ica_token_quantile` must be None or a number in (0, 1), got {quantile!r}.")


def token_threshold(reference_tokens, quantile: float) -> float:
    """The token log-probability under which a training token leaves the loss: the `quantile` of every token
    log-probability of the holdout's own responses, each scored with demonstrations from the rest of the holdout
    (leave-one-out), so that a share `quantile` of clean tokens falls under it."""
    check_token_quantile(quantile)
    values = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in reference_tokens] or [[]])
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError(
            "The holdout's own responses gave no finite token log-probabilities to set the token threshold from."
        )
    return float(np.quantile(values, quantile))


def token_keep(token_logps, threshold: float) -> list[np.ndarray]:
    """For each response, which of its tokens stay in the loss: those whose log-probability with the
    demonstrations is at least `threshold` ([`token_threshold`])."""
    return [np.asarray(t) >= threshold for t in token_logps]
