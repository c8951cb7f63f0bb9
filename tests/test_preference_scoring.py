import numpy as np
import pytest
from reference import naive_log_prob
from testing_utils import LOGP_ATOL, pair_rows

from trl_ica import score_ica
from trl_ica.scoring.formats import read_row
from trl_ica.scoring.ica import prepare_ica
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import token_counts
from trl_ica.scoring.rendering import Renderer


@pytest.mark.parametrize("fmt", ["conversational", "standard", "implicit"])
@pytest.mark.parametrize("selection", ["fixed", "knn"])
def test_pair_scores_equal_the_naive_four_sequence_computation(chat_model, tokenizer, fmt, selection):
    data, holdout = pair_rows(fmt), pair_rows(fmt)[:4]
    result = score_ica(
        chat_model,
        tokenizer,
        data,
        holdout,
        ICAScoringOptions(demo_selection=selection, form="difference", reduction="sum"),
        show_progress=False,
    )
    builder = prepare_ica(
        chat_model, tokenizer, data, holdout, ICAScoringOptions(demo_selection=selection), show_progress=False
    )
    renderer = Renderer(tokenizer)
    expected = []
    for i, row in enumerate(data):
        pair = read_row(row)
        demos = [read_row(holdout[j]).as_sft("chosen") for j in builder.demo_indices[i]]
        cw, cl = (
            naive_log_prob(chat_model, renderer.conditioned(pair.as_sft(s), demos)) for s in ("chosen", "rejected")
        )
        uw, ul = (naive_log_prob(chat_model, renderer.unconditioned(pair.as_sft(s))) for s in ("chosen", "rejected"))
        expected.append((cw - cl) - (uw - ul))
    np.testing.assert_allclose(result.scores, expected, atol=LOGP_ATOL)
    assert result.pair_logps.shape == (len(data), 4) and result.scores.dtype == np.float64


def test_pairs_share_demonstrations_and_prompt(chat_model, tokenizer):
    data = pair_rows("conversational")
    builder = prepare_ica(
        chat_model, tokenizer, data, data[:4], ICAScoringOptions(demo_selection="knn"), show_progress=False
    )
    chosen, rejected = builder.pair_requests(0, conditioned=True)
    assert chosen.prefix == rejected.prefix and chosen.response != rejected.response
    shared = token_counts([r for i in range(len(data)) for r in builder.pair_requests(i, True)]).shared
    assert shared >= len(data)  # at least one shared prefix per pair


def test_mean_reduction_for_pairs(chat_model, tokenizer):
    data = pair_rows("conversational")
    r = score_ica(
        chat_model,
        tokenizer,
        data,
        data[:4],
        ICAScoringOptions(reduction="mean", form="difference"),
        show_progress=False,
    )
    lp, n = r.pair_logps, r.pair_tokens
    np.testing.assert_allclose(
        r.scores, (lp[:, 0] / n[:, 0] - lp[:, 1] / n[:, 1]) - (lp[:, 2] / n[:, 0] - lp[:, 3] / n[:, 1])
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_conditioned_form_for_pairs_is_the_margin_with_demonstrations(chat_model, tokenizer, reduction):
    data = pair_rows("conversational")
    r = score_ica(
        chat_model,
        tokenizer,
        data,
        data[:4],
        ICAScoringOptions(form="conditioned", reduction=reduction),
        show_progress=False,
    )
    builder = prepare_ica(chat_model, tokenizer, data, data[:4], show_progress=False)
    expected = []
    for i in range(len(data)):
        chosen, rejected = builder.pair_requests(i, conditioned=True)
        lw, ll = naive_log_prob(chat_model, chosen), naive_log_prob(chat_model, rejected)
        nw, nl = (len(chosen.response), len(rejected.response)) if reduction == "mean" else (1, 1)
        expected.append(lw / nw - ll / nl)
    np.testing.assert_allclose(r.scores, expected, atol=LOGP_ATOL)
    assert np.isnan(r.pair_logps[:, 2:]).all() and np.isfinite(r.pair_logps[:, :2]).all()


def test_demonstrations_show_the_chosen_answer(tokenizer, chat_model):
    data = pair_rows("conversational")
    builder = prepare_ica(
        chat_model,
        tokenizer,
        data,
        data[:2],
        ICAScoringOptions(demo_selection="fixed", num_demos=2),
        show_progress=False,
    )
    text = tokenizer.decode(list(builder.pair_requests(3, True)[0].prefix))
    assert "The answer is 1." in text and "The answer is 0." not in text  # holdout 0: chosen "1", rejected "0"
