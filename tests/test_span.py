"""`ica_score_span`: the score of one span of each response (its last line, or a pattern such as a final answer),
with the rest of the response as context."""

import json
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import LOGP_ATOL, chat_row, score_files, tiny_llama

from trl_ica import ICADPOConfig, ICASFTConfig, ICASFTTrainer
from trl_ica.scoring.formats import read_dataset
from trl_ica.scoring.ica import prepare_ica, score_with
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.rendering import auto_span, span_chars

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


def test_auto_is_the_last_line_where_every_row_allows_a_span(tokenizer):
    """`"auto"` gives the requests and scores of `"last_line"` on rows that allow a span, with no warning, and the
    options it leaves behind (what a scores file and a checkpoint record) say `"last_line"`; on these multi-line
    responses those scores are not the whole response's (`"response"`, recorded as None, as before it had a name)."""
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert ICAScoringOptions(span="response") == ICAScoringOptions(span=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ica_score_span")
        auto = builder(tokenizer, model, "auto")
    last, whole = builder(tokenizer, model, "last_line"), builder(tokenizer, model, "response")
    assert auto.options == last.options and auto.options.span == "last_line" and auto.span_reason is None
    assert [auto.conditioned(i) for i in range(7)] == [last.conditioned(i) for i in range(7)]
    scores = {name: score_with(model, b, show_progress=False).scores for name, b in (("auto", auto), ("whole", whole))}
    np.testing.assert_array_equal(scores["auto"], score_with(model, last, show_progress=False).scores)
    assert not np.allclose(scores["auto"][:6], scores["whole"][:6])


def tool_row(i):
    call = {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": 1})}}
    completion = [
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": str(i + 1)},
        {"role": "assistant", "content": f"It is {i + 1}."},
    ]
    return {"prompt": [{"role": "user", "content": f"What is {i} plus 1?"}], "completion": completion}


def test_auto_scores_whole_responses_where_a_row_cannot_have_a_span(tokenizer):
    """One row without a span gives every row the whole response (a last line's score and a whole response's do
    not compare), and the reason names the row; pairs are scored by their margin, quietly."""
    train, holdout = rows()
    read = lambda data, name: read_dataset(data, name, tokenizer)  # noqa: E731
    examples, held = read(train, "dataset"), read(holdout, "holdout")
    assert auto_span(tokenizer, examples, held) == ("last_line", None)
    tools = read(Dataset.from_list([tool_row(i) for i in range(3)]), "dataset")
    span, reason = auto_span(tokenizer, examples[:2] + tools, held)
    assert span is None and "train_dataset row 2 has a response of several messages or tool calls" in reason
    span, reason = auto_span(tokenizer, examples, held + tools[1:])
    assert span is None and "holdout_dataset row 4" in reason
    lm = read(Dataset.from_list([{"text": f"Add {i}.\n#### {i}"} for i in range(4)]), "dataset")
    span, reason = auto_span(tokenizer, lm, lm)
    assert span is None and "train_dataset row 0 is a language-modeling or pre-tokenised row" in reason
    assert "`ica_score_span='response'`" in reason
    slow = type("Slow", (), {"is_fast": False})()
    span, reason = auto_span(slow, examples, held)
    assert span is None and "not a fast one" in reason
    pairs = read(Dataset.from_list([{"prompt": "Q", "chosen": "a\nb", "rejected": "c"}]), "dataset")
    assert auto_span(tokenizer, pairs, held) == (None, None)
    # through the scoring: the warning says why, and the requests are the whole response's
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    lm_rows = Dataset.from_list([{"text": f"Add {i}.\n#### {i}"} for i in range(4)])
    options = {span: ICAScoringOptions(num_demos=2, demo_selection="fixed", span=span) for span in ("auto", None)}
    with pytest.warns(UserWarning, match="train_dataset row 0 is a language-modeling"):
        auto = prepare_ica(model, tokenizer, lm_rows, lm_rows, options["auto"], show_progress=False)
    whole = prepare_ica(model, tokenizer, lm_rows, lm_rows, options[None], show_progress=False)
    assert auto.options == whole.options and auto.options.span is None
    assert [auto.conditioned(i) for i in range(4)] == [whole.conditioned(i) for i in range(4)]


def test_auto_yields_to_token_masks_and_pairs_take_no_other_span(tmp_path):
    """`"auto"` yields to `ica_token_quantile` (which scores every token), where a span set by name is refused; both
    presets score whole responses; pairs (scored by their margin) take `"auto"` or `"response"` only."""
    make = lambda **kw: ICASFTConfig(output_dir=str(tmp_path), use_cpu=True, **kw)  # noqa: E731
    assert make().ica_score_span == make(ica_preset="paper").ica_score_span == "response"
    assert make(ica_score_span="auto", ica_token_quantile=0.01).ica_score_span == "response"
    with pytest.raises(ValueError, match="`ica_score_span`='last_line' scores only a span"):
        make(ica_score_span="last_line", ica_token_quantile=0.01)
    for span in ("auto", "response"):
        assert ICADPOConfig(output_dir=str(tmp_path), use_cpu=True, ica_score_span=span).ica_score_span == span
    with pytest.raises(ValueError, match="preference pairs are scored by their whole margin"):
        ICADPOConfig(output_dir=str(tmp_path), use_cpu=True, ica_score_span="last_line")


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
