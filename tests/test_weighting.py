import numpy as np
import pytest

from trl_ica.scoring.weighting import WEIGHTINGS, compute_weights, score_range


def test_batch_minmax():
    np.testing.assert_allclose(compute_weights([1.0, 3.0, 2.0]), [0.0, 1.0, 0.5])


@pytest.mark.parametrize("scheme", ["batch_minmax", "none"])
def test_equal_scores_and_single_score_give_uniform_weights(scheme):
    np.testing.assert_allclose(compute_weights([2.5, 2.5, 2.5], scheme), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(compute_weights([-7.0], scheme), [1.0])


def test_global_minmax_uses_dataset_range_and_clips():
    np.testing.assert_allclose(
        compute_weights([0.0, 5.0, 20.0], "global_minmax", global_range=(0.0, 10.0)), [0, 0.5, 1]
    )
    with pytest.raises(ValueError, match="global_range"):
        compute_weights([1.0], "global_minmax")


def test_infinite_scores_take_the_extremes():
    np.testing.assert_allclose(compute_weights([np.inf, 1.0, 2.0, -np.inf]), [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(compute_weights([np.inf, np.inf]), [1.0, 1.0])


@pytest.mark.parametrize("scheme", WEIGHTINGS)
def test_nan_is_an_error_naming_rows(scheme):
    with pytest.raises(ValueError, match=r"\[1\] are NaN"):
        compute_weights([0.0, np.nan, 1.0], scheme, global_range=(0.0, 1.0), reference=[0.5])


def test_unknown_scheme():
    with pytest.raises(ValueError, match="`weighting` must be one of"):
        compute_weights([1.0], "minmax")


def test_empty_batch():
    assert compute_weights([], "batch_minmax").shape == (0,)
    assert score_range([np.nan, np.inf]) == (0.0, 0.0)


def _naive_quantile(s, reference):
    return np.mean([1.0 if r < s else 0.5 if r == s else 0.0 for r in reference])


def test_holdout_quantile_is_the_share_of_holdout_scores_beaten_ties_half():
    reference = [3.0, -1.0, 2.0, 2.0, 5.0]
    scores = [-4.0, -1.0, 0.0, 2.0, 2.5, 5.0, 9.0, np.inf, -np.inf]
    expected = [_naive_quantile(s, reference) for s in scores]
    np.testing.assert_allclose(compute_weights(scores, "holdout_quantile", reference=reference), expected)
    assert expected[:4] == [0.0, 0.1, 0.2, 0.4] and expected[-3:] == [1.0, 1.0, 0.0]  # ties at 2.0 count half


def test_holdout_quantile_weight_does_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=20)
    alone = compute_weights([0.3], "holdout_quantile", reference=reference)
    for _ in range(5):
        batch = np.concatenate([[0.3], rng.normal(size=7) * 10])
        assert compute_weights(batch, "holdout_quantile", reference=reference)[0] == alone[0]
    # a batch of good rows keeps them all: none is forced to 0
    good = compute_weights(reference.max() + 1 + np.arange(4.0), "holdout_quantile", reference=reference)
    np.testing.assert_array_equal(good, 1.0)


@pytest.mark.parametrize("cutoff", [1.0, 0.5, 0.1, 1 / 40])
def test_holdout_cutoff_gives_full_weight_from_that_share_of_the_holdout_up(cutoff):
    rng = np.random.default_rng(1)
    reference = np.round(rng.normal(size=40), 1)  # ties included
    scores = np.concatenate([np.round(rng.normal(size=200) * 1.5, 1), [-np.inf, np.inf]])
    expected = [min(1.0, _naive_quantile(s, reference) / cutoff) for s in scores]
    weights = compute_weights(scores, "holdout_quantile", reference=reference, cutoff=cutoff)
    np.testing.assert_allclose(weights, expected)
    beaten = np.array([_naive_quantile(s, reference) for s in scores])
    assert (weights[beaten >= cutoff] == 1).all() and (weights[beaten < cutoff] < 1).all()
    assert weights[-2] == 0 and weights[-1] == 1


@pytest.mark.parametrize("cutoff", [0, -0.1, 1.5, np.nan, True, "0.1"])
def test_holdout_cutoff_outside_its_range_is_refused(cutoff):
    with pytest.raises(ValueError, match=r"`cutoff` \(`ica_holdout_cutoff`\) must be a number in \(0, 1\]"):
        compute_weights([1.0], "holdout_quantile", reference=[0.0, 2.0], cutoff=cutoff)


@pytest.mark.parametrize(
    "scores, reference, message",
    [
        ([1.0, np.nan], [0.0, 1.0], r"rows \[1\] are NaN"),
        ([1.0], [0.0, np.nan], r"holdout's own ICA scores \(rows \[1\]\) are NaN"),
        ([1.0], [], "needs the holdout's own scores"),
        ([1.0], None, "needs the holdout's own scores"),
    ],
)
def test_holdout_quantile_refuses_nan_and_a_missing_reference(scores, reference, message):
    with pytest.raises(ValueError, match=message):
        compute_weights(scores, "holdout_quantile", reference=reference)


def _mixture(share, n_pool, n_holdout, gap, seed):
    """A holdout of N(0, 1) scores and a pool whose `share` is N(0, 1) (holdout-like) and the rest N(-gap, 1)."""
    rng = np.random.default_rng(seed)
    clean = int(round(share * n_pool))
    pool = np.concatenate([rng.normal(0, 1, clean), rng.normal(-gap, 1, n_pool - clean)])
    return pool, rng.normal(0, 1, n_holdout), np.arange(n_pool) < clean


@pytest.mark.parametrize("share", [0.3, 0.6, 0.9])
def test_holdout_share_recovers_the_mixture_share(share):
    """pi = P_pool(s >= t) / P_holdout(s >= t) at the holdout's median t. Its standard error: the pool's share above
    t is a binomial proportion (q = share / 2), and t itself is a sample median (sd 1.2533 / sqrt(n_holdout) for unit
    normal scores), which moves that share by share * phi(0) per unit; the ratio doubles both. The noise, 5 sd below,
    puts ~3e-7 of its rows above t."""
    from trl_ica.scoring.weighting import holdout_share

    n_pool, n_holdout = 4000, 400
    q = share / 2
    se = 2 * np.sqrt(q * (1 - q) / n_pool + (share * 0.39894 * 1.2533 / np.sqrt(n_holdout)) ** 2)
    for seed in range(3):
        pool, holdout, _ = _mixture(share, n_pool, n_holdout, 5.0, seed)
        assert abs(holdout_share(pool, holdout) - share) < 4 * se


@pytest.mark.parametrize("share", [0.3, 0.6, 0.9, 1.0])
def test_holdout_posterior_keeps_holdout_like_rows_whole_and_drops_the_others(share):
    """Against the true posterior of the mixture and against `holdout_quantile`, which spreads holdout-like rows
    over [0, 1] (mean 1/2), averaged over three draws: a holdout of 300 moves its own median by ~0.07 sd, which moves
    one draw's weights by several hundredths."""
    from scipy.stats import norm

    clean_means, other_means, errors = [], [], []
    for seed in range(3):
        pool, holdout, clean = _mixture(share, 3000, 300, 4.0, seed)
        weights = compute_weights(pool, "holdout_posterior", reference=holdout, pool=pool)
        truth = share * norm.pdf(pool) / (share * norm.pdf(pool) + (1 - share) * norm.pdf(pool, -4.0))
        assert np.all((weights >= 0) & (weights <= 1))
        order = np.argsort(pool)
        assert np.all(np.diff(weights[order]) >= -1e-12)  # a higher score is never less holdout-like
        quantile = compute_weights(pool, "holdout_quantile", reference=holdout)
        assert abs(quantile[clean].mean() - 0.5) < 0.05
        clean_means.append(weights[clean].mean())
        other_means.append(weights[~clean].mean() if share < 1 else 0.0)
        errors.append(np.abs(weights - truth).mean())
    assert np.mean(clean_means) > 0.85 and np.mean(other_means) < 0.12 and np.mean(errors) < 0.08


def test_a_heavy_tailed_holdout_does_not_lift_the_noise_to_weight_one():
    """Scores as a final-answer line's are: most rows near 0 (spread 0.01) and a tenth spread far below, where the
    noise also lies (the pool: 70 % such rows, 30 % uniform on [-3, -0.5]). The bandwidth follows the narrow bulk, so
    beside each of the holdout's few tail scores the kernel estimate of the pool's density is ~0 and the raw density
    ratio unbounded; made non-decreasing, one such spike lifts every weight above it to 1. Bounded by 1 / pi, the
    ratio gives the noise what the mixture does: in the tail the holdout-like rows are 0.7 x 0.1 / 2.8 per unit
    against the noise's 0.3 / 2.5, a posterior of ~0.17 there, so the clean rows keep ~0.9 + 0.1 x 0.17."""

    def draw(rng, n):
        return np.where(rng.random(n) < 0.1, rng.uniform(-3, -0.2, n), rng.normal(0, 0.01, n))

    clean_means, noise_means = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        holdout, pool = draw(rng, 60), np.concatenate([draw(rng, 168), rng.uniform(-3, -0.5, 72)])
        weights = compute_weights(pool, "holdout_posterior", reference=holdout, pool=pool)
        clean_means.append(weights[:168].mean())
        noise_means.append(weights[168:].mean())
    assert max(noise_means) < 0.25 and np.mean(noise_means) < 0.15 and np.mean(clean_means) > 0.8


def test_holdout_posterior_needs_the_pool_and_a_spread_holdout():
    with pytest.raises(ValueError, match="every training row's"):
        compute_weights([0.0, 1.0], "holdout_posterior", reference=[0.0, 1.0])
    with pytest.raises(ValueError, match="all equal"):
        compute_weights([0.0, 1.0], "holdout_posterior", reference=[1.0, 1.0, 1.0], pool=[0.0, 1.0])
    with pytest.raises(ValueError, match="at least 2 finite holdout's own scores, got 1"):
        compute_weights([0.0, 1.0], "holdout_posterior", reference=[1.0], pool=[0.0, 1.0])


def test_holdout_posterior_gives_minus_infinity_weight_zero():
    """A row without the span `ica_score_span` scores gets -inf: weight 0, and it does not enter the pool's density."""
    pool, holdout, _ = _mixture(0.5, 400, 100, 4.0, 0)
    with_missing = np.concatenate([pool, [-np.inf, -np.inf]])
    weights = compute_weights(with_missing, "holdout_posterior", reference=holdout, pool=with_missing)
    assert weights[-2:].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(weights[:-2], compute_weights(pool, "holdout_posterior", reference=holdout, pool=pool))
