import numpy as np
import pytest

from trl_ica.weighting import WEIGHTINGS, compute_weights, rank_weights, score_range


def test_batch_minmax():
    np.testing.assert_allclose(compute_weights([1.0, 3.0, 2.0]), [0.0, 1.0, 0.5])


@pytest.mark.parametrize("scheme", ["batch_minmax", "softmax", "rank", "none"])
def test_equal_scores_and_single_score_give_uniform_weights(scheme):
    np.testing.assert_allclose(compute_weights([2.5, 2.5, 2.5], scheme), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(compute_weights([-7.0], scheme), [1.0])


def test_global_minmax_uses_dataset_range_and_clips():
    np.testing.assert_allclose(
        compute_weights([0.0, 5.0, 20.0], "global_minmax", global_range=(0.0, 10.0)), [0, 0.5, 1]
    )
    with pytest.raises(ValueError, match="global_range"):
        compute_weights([1.0], "global_minmax")


def test_softmax_has_mean_one_and_follows_temperature():
    w = compute_weights([0.0, 1.0], "softmax", temperature=0.5)
    assert w.mean() == pytest.approx(1.0)
    assert w[1] / w[0] == pytest.approx(np.exp(2.0))
    with pytest.raises(ValueError, match="temperature"):
        compute_weights([0.0, 1.0], "softmax", temperature=0)


def test_rank_with_ties():
    np.testing.assert_allclose(rank_weights([3.0, 1.0, 3.0, 2.0]), [(2.5) / 3, 0.0, 2.5 / 3, 1 / 3])


def test_infinite_scores_take_the_extremes():
    np.testing.assert_allclose(compute_weights([np.inf, 1.0, 2.0, -np.inf]), [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(compute_weights([np.inf, np.inf]), [1.0, 1.0])


@pytest.mark.parametrize("scheme", WEIGHTINGS)
def test_nan_is_an_error_naming_rows(scheme):
    with pytest.raises(ValueError, match=r"\[1\] are NaN"):
        compute_weights([0.0, np.nan, 1.0], scheme, global_range=(0.0, 1.0))


def test_unknown_scheme():
    with pytest.raises(ValueError, match="`weighting` must be one of"):
        compute_weights([1.0], "minmax")


def test_empty_batch():
    assert compute_weights([], "batch_minmax").shape == (0,)
    assert score_range([np.nan, np.inf]) == (0.0, 0.0)
