import json

import numpy as np
import pytest
from datasets import Dataset
from reference import naive_log_prob
from testing_utils import LOGP_ATOL, MEAN_LOGP_ATOL, chat_row, pair_rows, score_files, tiny_llama

from trl_ica.cli import main
from trl_ica.scoring.demonstrations import model_embeddings, select_demos
from trl_ica.scoring.formats import read_dataset
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import LogProbRequest
from trl_ica.scoring.rendering import Renderer
from trl_ica.selection.baselines import METHODS, score_dataset, select_top


def sft_rows(n=7):
    return [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 2)) for i in range(n)]


def holdout_rows():
    return [chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(4)]


def test_loss_is_the_mean_log_prob_per_response_token(chat_model, tokenizer):
    rows = sft_rows()
    scores = score_dataset("loss", chat_model, tokenizer, rows, show_progress=False)
    renderer = Renderer(tokenizer)
    expected = [
        naive_log_prob(chat_model, r) / len(r.response) for r in map(renderer.unconditioned, read_dataset(rows))
    ]
    np.testing.assert_allclose(scores, expected, atol=MEAN_LOGP_ATOL)


def test_loss_of_pairs_is_the_per_token_margin(chat_model, tokenizer):
    rows = pair_rows("conversational")
    scores = score_dataset("loss", chat_model, tokenizer, rows, show_progress=False)
    renderer = Renderer(tokenizer)
    expected = []
    for pair in read_dataset(rows):
        good, bad = (renderer.unconditioned(pair.as_sft(w)) for w in ("chosen", "rejected"))
        expected.append(
            naive_log_prob(chat_model, good) / len(good.response) - naive_log_prob(chat_model, bad) / len(bad.response)
        )
    np.testing.assert_allclose(scores, expected, atol=MEAN_LOGP_ATOL)


@pytest.mark.parametrize("fmt", ["conversational", "standard"])
def test_ifd_is_the_ratio_of_perplexities_with_and_without_the_prompt(chat_model, tokenizer, fmt):
    rows = sft_rows()
    if fmt == "standard":
        rows = [{"prompt": r["prompt"][0]["content"], "completion": " " + r["completion"][0]["content"]} for r in rows]
    scores = score_dataset("ifd", chat_model, tokenizer, rows, show_progress=False)
    renderer = Renderer(tokenizer)
    expected = []
    for example in read_dataset(rows):
        given = renderer.unconditioned(example)
        if fmt == "conversational":
            alone = renderer.unconditioned(type(example)(example.prompt, example.response, ""))
        else:
            alone = LogProbRequest((tokenizer.eos_token_id,), (), given.response)
        assert len(alone.context) < len(given.context) and alone.response == given.response
        n = len(given.response)
        expected.append((naive_log_prob(chat_model, alone) - naive_log_prob(chat_model, given)) / n)
    # the log of the score is a difference of two per-token means
    np.testing.assert_allclose(np.log(scores), expected, atol=2 * MEAN_LOGP_ATOL, rtol=0)


def test_oneshot_is_the_mean_gain_of_the_nearest_holdout_answers(chat_model, tokenizer):
    rows, held = sft_rows(), holdout_rows()
    scores = score_dataset(
        "oneshot", chat_model, tokenizer, rows, held, ICAScoringOptions(num_demos=2), show_progress=False
    )
    examples, hold = read_dataset(rows), read_dataset(held)
    embed = lambda texts: model_embeddings(chat_model, tokenizer, texts, show_progress=False)  # noqa: E731
    nearest = select_demos([e.question for e in examples], [h.question for h in hold], 2, "knn", 0, embed)
    renderer = Renderer(tokenizer)
    expected = [
        np.mean(
            [
                naive_log_prob(chat_model, renderer.conditioned(hold[j], [e]))
                - naive_log_prob(chat_model, renderer.unconditioned(hold[j]))
                for j in nearest[i]
            ]
        )
        for i, e in enumerate(examples)
    ]
    np.testing.assert_allclose(scores, expected, atol=LOGP_ATOL)
    assert np.ptp(scores) > 0


def test_oneshot_with_a_preference_holdout_uses_the_margin(chat_model, tokenizer):
    rows = pair_rows("conversational")
    scores = score_dataset(
        "oneshot", chat_model, tokenizer, rows[3:], rows[:3], ICAScoringOptions(num_demos=1), show_progress=False
    )
    examples, hold = read_dataset(rows[3:]), read_dataset(rows[:3])
    embed = lambda texts: model_embeddings(chat_model, tokenizer, texts, show_progress=False)  # noqa: E731
    nearest = select_demos([e.question for e in examples], [h.question for h in hold], 1, "knn", 0, embed)
    renderer = Renderer(tokenizer)

    def margin(j, demos):
        lp = []
        for which in ("chosen", "rejected"):
            target = hold[j].as_sft(which)
            request = renderer.conditioned(target, demos) if demos else renderer.unconditioned(target)
            lp.append(naive_log_prob(chat_model, request))
        return lp[0] - lp[1]

    expected = [
        margin(nearest[i][0], [e.as_sft("chosen")]) - margin(nearest[i][0], []) for i, e in enumerate(examples)
    ]
    np.testing.assert_allclose(scores, expected, atol=LOGP_ATOL)


def test_rho_is_the_loss_reduction_of_the_reference_model(chat_model, tokenizer):
    rows = sft_rows()
    reference = tiny_llama(seed=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    scores = score_dataset("rho", chat_model, tokenizer, rows, reference_model=reference, show_progress=False)
    loss = score_dataset("loss", chat_model, tokenizer, rows, show_progress=False)
    ref_loss = score_dataset("loss", reference, tokenizer, rows, show_progress=False)
    # the same two forwards as the losses', subtracted in float64: equal up to float64 rounding
    np.testing.assert_allclose(scores, (-loss) - (-ref_loss), atol=1e-9)
    with pytest.raises(ValueError, match="`method='rho'` needs `reference_model`"):
        score_dataset("rho", chat_model, tokenizer, rows, show_progress=False)


def test_random_is_seeded_and_methods_check_their_inputs(chat_model, tokenizer):
    rows = sft_rows()
    a, b = (score_dataset("random", None, None, rows, options=ICAScoringOptions(seed=s)) for s in (1, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, score_dataset("random", None, None, rows, options=ICAScoringOptions(seed=2)))
    with pytest.raises(ValueError, match="`method` must be one of"):
        score_dataset("nuggets", chat_model, tokenizer, rows)
    with pytest.raises(ValueError, match="`method='ica'` needs a holdout"):
        score_dataset("ica", chat_model, tokenizer, rows)
    with pytest.raises(ValueError, match="`method='ifd'` is defined for SFT examples"):
        score_dataset("ifd", chat_model, tokenizer, pair_rows("conversational"))
    assert set(METHODS) == {"ica", "whisperer", "oneshot", "rho", "loss", "ifd", "random"}


def test_select_top_bottom_and_threshold_are_deterministic():
    scores = np.array([0.5, 2.0, 2.0, -1.0, 3.0, 2.0])
    np.testing.assert_array_equal(select_top(scores, 0.5), [1, 2, 4])  # ties at 2.0: the earlier rows first
    np.testing.assert_array_equal(select_top(scores, 0.34, mode="bottom"), [0, 3])
    np.testing.assert_array_equal(select_top(scores, mode="threshold", threshold=2.0), [1, 2, 4, 5])
    np.testing.assert_array_equal(select_top(scores, 0.01), [4])  # at least one row
    for ratio in (0, 1.5, -0.1, None):
        with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\]"):
            select_top(scores, ratio)
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        select_top([1.0, np.nan], 0.5)
    with pytest.raises(ValueError, match="`scores` is empty"):
        select_top([], 0.5)


def test_cli_scores_every_row_and_selects_a_subset(tmp_path, tokenizer, monkeypatch, capsys):
    rows = [{**r, "kind": "long" if i % 2 else "short"} for i, r in enumerate(sft_rows(8))]
    files = score_files(tmp_path, tokenizer, rows, holdout_rows(), holdout_file="holdout.parquet")
    out = tmp_path / "scored.jsonl"
    main(["score", "--method", "ica", *files, "--output", str(out), "--label-column", "kind"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 8 and summary["seconds"] > 0
    # `seconds` is rounded to 1 ms and `rows_per_second` to 0.01: the tolerance those roundings allow
    tolerance = 8 / (summary["seconds"] - 0.0005) - 8 / summary["seconds"] + 0.005
    assert summary["rows_per_second"] == pytest.approx(8 / summary["seconds"], abs=tolerance)
    scored = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in scored] == [r["prompt"] for r in rows] and all("score" in r for r in scored)
    assert (tmp_path / "scored.png").is_file()
    # A user's `--num-demos 0` reaches the validation instead of becoming the default
    with pytest.raises(ValueError, match=r"`num_demos` must be a positive integer, at most the holdout.s size, got 0"):
        main(["score", "--method", "ica", *files, "--output", str(tmp_path / "zero.jsonl"), "--num-demos", "0"])
    main(["select", "--scores", str(out), "--ratio", "0.25", "--output", str(tmp_path / "subset.jsonl")])
    subset = [json.loads(line) for line in open(tmp_path / "subset.jsonl")]
    best = sorted(range(8), key=lambda i: -scored[i]["score"])[:2]
    assert [r["prompt"] for r in subset] == [rows[i]["prompt"] for i in sorted(best)]
    assert "score" not in subset[0]


def test_cli_conditioned_form_equals_the_library(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    files = score_files(tmp_path, tokenizer, sft_rows(6), holdout_rows())
    out = tmp_path / "scored.jsonl"
    main(["score", "--method", "ica", "--form", "conditioned", "--reduction", "mean", *files, "--output", str(out)])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    expected = score_dataset("ica", model, tokenizer, sft_rows(6), holdout_rows(), show_progress=False)
    paper = ICAScoringOptions.from_preset("paper")
    paper = score_dataset("ica", model, tokenizer, sft_rows(6), holdout_rows(), paper, show_progress=False)
    got = [json.loads(line)["score"] for line in open(out)]
    np.testing.assert_allclose(got, expected, atol=LOGP_ATOL)
    assert not np.allclose(got, paper, atol=1e-2)


def test_cli_errors_name_the_argument(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    Dataset.from_list([{"prompt": "a", "completion": "b"}]).to_json(tmp_path / "unscored.jsonl")
    Dataset.from_list([{"prompt": "a", "completion": "b", "score": 1.0}]).to_json(tmp_path / "scored.jsonl")
    select = ["select", "--output", str(tmp_path / "x.jsonl"), "--scores"]
    with pytest.raises(ValueError, match="`--scores` .* has no 'score' column"):
        main([*select, str(tmp_path / "unscored.jsonl"), "--ratio", "0.5"])
    with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\], got 2.0"):
        main([*select, str(tmp_path / "scored.jsonl"), "--ratio", "2"])
    score = ["score", "--method", "random", "--model", "m", "--output", str(tmp_path / "o.jsonl"), "--dataset"]
    with pytest.raises(ValueError, match="`--dataset` file .* does not exist"):
        main([*score, str(tmp_path / "no.jsonl")])
    with pytest.raises(ValueError, match="`--dataset` file .* is empty"):
        main([*score, str(tmp_path / "empty.jsonl")])
    with pytest.raises(ValueError, match="`--dataset` already has a 'score' column"):
        main([*score, str(tmp_path / "scored.jsonl")])
    with pytest.raises(SystemExit):
        main(["score", "--method", "nuggets", "--model", "m", "--dataset", "d.jsonl", "--output", "o.jsonl"])


def test_model_embeddings_equal_one_text_at_a_time(chat_model, tokenizer):
    """Batched by length under a token budget (and under bf16 autocast when asked), each embedding is the mean-pooled
    hidden state of its own text alone: padding and batch-mates change nothing beyond rounding."""
    import torch

    texts = [f"What is {i} plus {i * 7}? Give the answer in words, please." * (1 + i % 3) for i in range(9)]
    alone = np.stack([model_embeddings(chat_model, tokenizer, [t])[0] for t in texts])
    batched = model_embeddings(chat_model, tokenizer, texts, max_batch_tokens=64)
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)  # unit vectors: float32 rounding is ~1e-7
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    seen = []
    hook = chat_model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    low = model_embeddings(chat_model, tokenizer, texts, compute_dtype=torch.bfloat16)
    hook.remove()
    assert set(seen) == {torch.bfloat16} and low.dtype == np.float32
    assert np.abs(low - alone).max() < 0.05  # bf16 rounding of unit vectors, not another text's embedding
    assert min(np.abs(alone[i] - alone[j]).max() for i in range(9) for j in range(i)) > 0.05
