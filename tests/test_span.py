"""`ica_score_span`: the score of one span of each response (its last line, or a pattern such as a final answer),
with the rest of the response as context."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import LOGP_ATOL, chat_row, score_files, tiny_llama

from trl_ica import ICADPOConfig, ICASFTConfig, ICASFTTrainer
from trl_ica.scoring.ica import prepare_ica, score_with
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.rendering import span_chars

FINAL = "#### .*"


def rows():
    train = [
        chat_row(f"What is {i} plus {i + 1}?", f"Add them.\nThat makes {2 * i + 1}.\n#### {2 * i + 1}")
        for i in range(6)
    ]
    train.append(chat_row("What is 3 plus 3?", "Add them."))  # truncated: no final answer
    holdout = [chat_row(f"What is {i} plus 7?", f"Add them.\n#### {i + 7}") for i in range(4)]
    return Dataset.from_list(train), Dataset.from_list(holdout)


def builder(tokenizer, model, span, **fields):
    train, holdout = rows()
    options = ICAScoringOptions(
        num_demos=2, demo_selection="fixed", form="conditioned", reduction="sum", span=span, **fields
    )
    return prepare_ica(model, tokenizer, train, holdout, options, show_progress=False)


@torch.no_grad()
def naive_span_logp(model, request, first: int, last: int) -> float:
    """Sum of log p(token) over the response tokens [first, last) of a whole (unspanned) request, from one full
    forward of prefix + context + response."""
    ids = list(request.prefix + request.context + request.response)
    start = len(request.prefix) + len(request.context)
    logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logp[start + t - 1, ids[start + t]] for t in range(first, last)))


def test_span_chars():
    assert span_chars("a\nb = 3\n#### 3", "last_line") == (8, 14)
    assert span_chars("a\nb\n\n", "last_line") == (2, 3)  # trailing newlines aside
    assert span_chars("x #### 1 and #### 22", "#### [0-9]+") == (13, 20)  # the last match
    assert span_chars("no answer", FINAL) is None and span_chars("  \n", "last_line") is None


@pytest.mark.parametrize("span", ["last_line", FINAL])
@pytest.mark.parametrize("layout", ["turns", "in_turn"])
def test_span_score_is_the_spans_log_prob_given_everything_before_it(tokenizer, span, layout):
    """Against a full forward of the whole conditioned sequence, summing the span's tokens only; the span's tokens
    are the whole response's, as training tokenises it, and decode to the final line with its closing token."""
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    spanned = builder(tokenizer, model, span, layout=layout)
    whole = builder(tokenizer, model, None, layout=layout)
    result = score_with(model, spanned, show_progress=False)
    for i in range(6):
        full, part = whole.conditioned(i), spanned.conditioned(i)
        assert (
            part.prefix + part.context + part.response
            == (full.prefix + full.context + full.response)[
                : len(part.prefix) + len(part.context) + len(part.response)
            ]
        )
        k = len(part.context) - len(full.context)
        text = tokenizer.decode(list(part.response))
        assert text.startswith(f"#### {2 * i + 1}") and tokenizer.eos_token in text
        expected = naive_span_logp(model, full, k, k + len(part.response))
        assert result.logp_conditioned[i] == pytest.approx(expected, abs=LOGP_ATOL)
        assert result.num_tokens[i] == len(part.response) < len(full.response)


@pytest.mark.parametrize("layout", ["turns", "in_turn"])
def test_the_last_line_of_a_one_line_response_is_the_whole_response(tokenizer, layout):
    """`"last_line"` changes nothing where every response is one line: the requests are the row score's, token for
    token, so are the scores."""
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    train = Dataset.from_list([chat_row(f"What is {i} plus {i + 1}?", f"It is {2 * i + 1}.") for i in range(6)])
    holdout = Dataset.from_list([chat_row(f"What is {i} plus 7?", f"It is {i + 7}.\n") for i in range(4)])
    built = {
        span: prepare_ica(
            model,
            tokenizer,
            train,
            holdout,
            ICAScoringOptions(num_demos=2, demo_selection="fixed", form="conditioned", layout=layout, span=span),
            show_progress=False,
        )
        for span in (None, "last_line")
    }
    assert [built["last_line"].conditioned(i) for i in range(6)] == [built[None].conditioned(i) for i in range(6)]
    whole, last = (score_with(model, built[span], show_progress=False) for span in (None, "last_line"))
    np.testing.assert_array_equal(last.scores, whole.scores)


def test_a_response_without_the_span_scores_minus_infinity_and_gets_weight_zero(tokenizer):
    from trl_ica.scoring.weighting import compute_weights

    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    result = score_with(model, builder(tokenizer, model, FINAL), show_progress=False)
    assert np.isneginf(result.scores[6]) and np.isfinite(result.scores[:6]).all()
    assert compute_weights(result.scores, "holdout_quantile", reference=result.scores[:6])[6] == 0
    # the last line of the truncated row is its whole response: scored like any other
    assert np.isfinite(score_with(model, builder(tokenizer, model, "last_line"), show_progress=False).scores).all()


def test_what_a_span_cannot_score_is_refused(tokenizer, tmp_path):
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    train, holdout = rows()
    options = ICAScoringOptions(num_demos=2, demo_selection="fixed", span="#### 1[0-9]")
    with pytest.raises(ValueError, match=r"holdout rows \[0, 1, 2\] \(3 of 4\) have no such span"):
        prepare_ica(model, tokenizer, train, holdout, options, show_progress=False)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        ICAScoringOptions(span="#### (")
    with pytest.raises(ValueError, match="language-modeling rows have no prompt"):
        lm = Dataset.from_list([{"text": f"Add {i}.\n#### {i}"} for i in range(4)])
        prepare_ica(model, tokenizer, lm, lm, ICAScoringOptions(num_demos=2, span=FINAL), show_progress=False)
    with pytest.raises(ValueError, match="preference pairs are scored by their whole margin"):
        ICADPOConfig(output_dir=str(tmp_path), use_cpu=True, ica_score_span=FINAL)


@pytest.mark.parametrize("refresh", [1, "online"])
def test_an_sft_run_weights_by_the_span_score(tokenizer, tmp_path, refresh):
    train, holdout = rows()
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    args = ICASFTConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        max_steps=2,
        per_device_train_batch_size=4,
        ica_num_demos=2,
        ica_demo_selection="fixed",
        ica_score_span=FINAL,
        ica_refresh=refresh,
        ica_weight_mode="loss",  # every row trained, its weight logged at its step
        seed=0,
    )
    trainer = ICASFTTrainer(model, args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout)
    trainer.train()
    logged = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    truncated = [r for r in logged if r["ica_index"] == 6]
    assert truncated and all(r["weight"] == 0 for r in truncated)
    expected = score_with(model.eval(), builder(tokenizer, model, FINAL), show_progress=False)
    if refresh == 1:  # scored before training, with the untrained model: check against the first scoring
        first = [json.loads(line) for line in open(tmp_path / "ica" / "refresh-0.jsonl")]
        assert [r["num_tokens"] for r in first] == expected.num_tokens.tolist()


def test_cli_score_span_equals_the_library_and_records_the_span(tmp_path, tokenizer):
    from trl_ica.cli.main import main

    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    train, holdout = rows()
    files = score_files(tmp_path, tokenizer, train, holdout, model=model)
    no_holdout = files[:4]  # `--model` and `--dataset`
    out = tmp_path / "scored.jsonl"
    main(
        [
            "score",
            "--method",
            "ica",
            *files,
            "--output",
            str(out),
            "--num-demos",
            "2",
            "--demo-selection",
            "fixed",
            "--form",
            "conditioned",
            "--reduction",
            "sum",
            "--score-span",
            FINAL,
        ]
    )
    scored = [json.loads(line)["score"] for line in open(out)]
    expected = score_with(model, builder(tokenizer, model, FINAL), show_progress=False).scores
    assert scored[6] is None and np.isneginf(expected[6])  # JSON has no -inf: the row without the span is null
    np.testing.assert_allclose(scored[:6], expected[:6], atol=LOGP_ATOL)
    # read back as a trainer reads a scores file: null is -inf again, and the span is part of what must match
    from trl_ica.data_io import read_scores_file, scores_meta_path

    assert json.load(open(scores_meta_path(str(out))))["ica_score_span"] == FINAL
    again = read_scores_file(str(out), train, {"ica_score_span": FINAL})
    assert np.isneginf(again[6]) and np.allclose(again[:6], expected[:6], atol=LOGP_ATOL)
    with pytest.raises(ValueError, match="scored with other settings"):
        read_scores_file(str(out), train, {"ica_score_span": None})
    main(["select", "--scores", str(out), "--ratio", "0.5", "--mode", "bottom", "--output", str(tmp_path / "b.jsonl")])
    bottom = [json.loads(line)["completion"] for line in open(tmp_path / "b.jsonl")]
    assert train[6]["completion"] in bottom and len(bottom) == 3  # half of 7 rows; the one without an answer is last
    with pytest.raises(ValueError, match="applies to `method='ica'` only"):
        main(
            ["score", "--method", "loss", *no_holdout, "--output", str(tmp_path / "loss.jsonl"), "--score-span", FINAL]
        )
