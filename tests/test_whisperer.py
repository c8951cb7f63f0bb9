from collections import Counter
from decimal import Decimal

import numpy as np
import pytest
import torch
from reference import naive_whisperer
from testing_utils import (
    FOUR_BIT_QUERY_SCORE_TOL,
    QUERY_SCORE_TOL,
    WEIGHT_ATOL,
    chat_row,
    four_bit_tiny_llama,
    score_files,
    tiny_llama,
)

from trl_ica.scoring.formats import read_dataset
from trl_ica.selection.baselines import score_dataset
from trl_ica.selection.whisperer import (
    Metric,
    WhispererConfig,
    build_prompts,
    final_number,
    split_answers,
    whisperer_scores,
)


def _rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        answer = f"{i} plus {i + 1} is {2 * i + 1}." + " So" * (i % 4) + f"\n#### {2 * i + 1}"
        rows.append(chat_row(f"What is {i} plus {i + 1}?" + " Quick." * (i % 3), answer))
    return rows


def _model(tokenizer, layers=3):
    return tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=layers)


def _check_against_naive(model, tokenizer, pool_rows, holdout_rows, config, metric_name, tol=QUERY_SCORE_TOL):
    ours = whisperer_scores(model, tokenizer, pool_rows, holdout_rows, config, show_progress=False)
    pool = read_dataset(pool_rows, "dataset")
    held = read_dataset(holdout_rows, "holdout") if holdout_rows is not None else None
    builder, prompts = build_prompts(tokenizer, pool, held, config)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = config.layer if config.layer is not None else lm.config.num_hidden_layers // 2
    scores, records = naive_whisperer(
        model,
        tokenizer,
        pool,
        held or pool,
        prompts,
        builder,
        Metric(metric_name) if metric_name != "log_likelihood" else "log_likelihood",
        config.num_queries,
        layer,
        config.max_new_tokens,
    )
    assert len(ours.records) == len(records)
    for mine, theirs in zip(ours.records, records):
        assert mine["demos"] == theirs["demos"] and mine["queries"] == theirs["queries"]
        np.testing.assert_allclose(mine["weights"], theirs["weights"], atol=WEIGHT_ATOL)
        np.testing.assert_allclose(mine["query_scores"], theirs["query_scores"], **tol)
        assert mine.get("generation") == theirs.get("generation")
    np.testing.assert_allclose(ours.scores, scores, **tol)
    return ours


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("with_holdout", [False, True])
def test_log_likelihood_scores_equal_the_naive_per_prompt_computation(tokenizer, batch_size, with_holdout):
    model = _model(tokenizer)
    config = WhispererConfig(num_demos=3, num_queries=2, metric="log_likelihood", batch_size=batch_size, seed=1)
    ours = _check_against_naive(
        model, tokenizer, _rows(10), _rows(5, offset=20) if with_holdout else None, config, "log_likelihood"
    )
    assert ours.summary()["distinct_scores"] == 10  # every example scored, no ties


@pytest.mark.parametrize("metric", ["exact_match", "rouge_l"])
def test_generated_answers_and_attention_equal_generate_plus_an_eager_pass(tokenizer, metric):
    """Batched generation after the shared instruction cache (with padding in the middle) gives the same tokens as
    generating each prompt alone, and the probed layer equals eager attention of that layer."""
    model = _model(tokenizer)
    config = WhispererConfig(num_demos=3, num_queries=2, metric=metric, batch_size=3, max_new_tokens=10, layer=2)
    ours = _check_against_naive(model, tokenizer, _rows(9), None, config, metric)
    assert ours.layer == 2 and ours.prompts == 3


def test_every_example_is_a_demo_min_demo_count_times_and_never_its_own_query(tokenizer):
    pool = read_dataset(_rows(23), "dataset")
    config = WhispererConfig(num_demos=4, num_queries=3, min_demo_count=3, metric="log_likelihood")
    _, prompts = build_prompts(tokenizer, pool, None, config)
    seen = Counter(i for p in prompts for i in p.demos)
    assert set(seen) == set(range(23)) and min(seen.values()) >= 3
    for p in prompts:
        assert len(set(p.demos)) == 4 and len(set(p.queries)) == 3 and not set(p.demos) & set(p.queries)
    held = read_dataset(_rows(6, offset=50), "holdout")
    _, prompts = build_prompts(tokenizer, pool, held, config)
    assert all(max(p.queries) < 6 for p in prompts)  # holdout row indices


def test_final_numbers_parse_with_separators_and_answers_split_per_question():
    assert final_number("so she pays $1,234.50 in all.\n#### 1,234.50") == Decimal("1234.50")
    assert final_number("The total is 1,000,000.") == Decimal("1000000")
    assert final_number("#### -7") == Decimal("-7")
    assert final_number("no number here") is None
    assert final_number("3 apples and 4 pears #### 12") == Decimal("12")
    text = "Answer 1: 2 plus 3\n#### 5\n\nAnswer 3: #### 1,200\n\nAnswer 4: ignored"
    assert split_answers(text, 3) == ["2 plus 3\n#### 5", None, "#### 1,200"]
    em = Metric("exact_match")
    assert em("#### 1,200", "work\n#### 1200") == 1.0 and em("#### 12", "#### 1200") == 0.0
    rouge = Metric("rouge_l")
    assert rouge("the cat sat", "the cat sat") == 1.0 and rouge("dogs bark", "the cat sat") == 0.0


def test_unparsed_prompts_score_zero_and_are_counted(tokenizer, monkeypatch):
    import trl_ica.selection.whisperer as whisperer

    monkeypatch.setattr(whisperer, "split_answers", lambda text, n: [None] * n)
    result = whisperer_scores(
        _model(tokenizer),
        tokenizer,
        _rows(8),
        config=WhispererConfig(num_demos=2, num_queries=2, max_new_tokens=4),
        show_progress=False,
    )
    summary = result.summary()
    assert summary["unparsed_prompts"] == summary["prompts"] == 4 and summary["missing_answers"] == 8
    assert np.all(result.scores == 0) and np.all(result.demo_counts >= 1)


def test_lora_and_4bit_models_match_the_naive_computation(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = WhispererConfig(num_demos=2, num_queries=2, metric="log_likelihood", batch_size=2)
    lora = get_peft_model(
        _model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    _check_against_naive(lora, tokenizer, _rows(6), None, config, "log_likelihood")
    quantised = four_bit_tiny_llama(tokenizer, tmp_path)
    _check_against_naive(quantised, tokenizer, _rows(6), None, config, "log_likelihood", FOUR_BIT_QUERY_SCORE_TOL)


def test_score_dataset_runs_whisperer_and_errors_name_the_argument(tokenizer):
    model = _model(tokenizer)
    config = WhispererConfig(num_demos=2, num_queries=2, metric="log_likelihood")
    direct = whisperer_scores(model, tokenizer, _rows(6), config=config, show_progress=False).scores
    via = score_dataset("whisperer", model, tokenizer, _rows(6), whisperer=config, show_progress=False)
    np.testing.assert_array_equal(direct, via)
    with pytest.raises(ValueError, match="fewer than num_demos"):
        whisperer_scores(model, tokenizer, _rows(3), config=config)
    with pytest.raises(ValueError, match="`layer` must be in"):
        whisperer_scores(model, tokenizer, _rows(6), config=WhispererConfig(num_demos=2, num_queries=2, layer=7))
    no_numbers = [{"prompt": "Say hi.", "completion": "hello"}] * 6
    with pytest.raises(ValueError, match="needs a final number"):
        whisperer_scores(model, tokenizer, no_numbers, config=WhispererConfig(num_demos=2, num_queries=2))
    pairs = [{"prompt": "q", "chosen": "1", "rejected": "2"}] * 6
    with pytest.raises(ValueError, match="not for preference pairs"):
        whisperer_scores(model, tokenizer, pairs, config=config)
    with pytest.raises(ValueError, match="`metric`"):
        WhispererConfig(metric="bleu")
    with pytest.raises(ValueError, match="`num_queries` must be a positive integer"):
        WhispererConfig(num_queries=0)
    with pytest.raises(ValueError, match="positions"):
        whisperer_scores(
            tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64), tokenizer, _rows(6), config=config
        )


def test_training_still_gets_gradients_after_scoring_a_4bit_model(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(four_bit_tiny_llama(tokenizer, tmp_path), LoraConfig(r=4, target_modules=["q_proj"]))
    model.train()
    whisperer_scores(
        model,
        tokenizer,
        _rows(6),
        config=WhispererConfig(num_demos=2, num_queries=2, metric="log_likelihood"),
        show_progress=False,
    )
    assert model.training
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_cli_writes_whisperer_scores_and_its_summary(tmp_path, tokenizer, capsys):
    import json

    from trl_ica.cli import main

    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_hidden_layers=3)
    files = score_files(tmp_path, tokenizer, _rows(7), model=model)
    out = tmp_path / "scored.jsonl"
    options = ["--metric", "log_likelihood", "--num-demos", "2", "--num-queries", "2", "--layer", "2", "--seed", "3"]
    main(["score", "--method", "whisperer", *files, "--output", str(out), *options])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 4 and summary["layer"] == 2 and summary["unparsed_prompts"] == 0
    scored = [json.loads(line)["score"] for line in open(out)]
    config = WhispererConfig(num_demos=2, num_queries=2, metric="log_likelihood", layer=2, seed=3)
    expected = whisperer_scores(model, tokenizer, _rows(7), config=config, show_progress=False).scores
    np.testing.assert_allclose(scored, expected, **QUERY_SCORE_TOL)  # another process, its own batch shapes


def test_generation_stops_once_nothing_more_can_be_parsed(tokenizer):
    from trl_ica.selection.whisperer import AnswersDone

    stop = AnswersDone(tokenizer, start=0, num_queries=2)

    def done(text):
        return bool(stop(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]), None)[0])

    assert not done(" 12\n\n")  # answer 2 may still come
    assert not done(" 12\n\nAnswer 2: 7")
    assert done(" 12\n\nAnswer 2: 7\n\n")  # the last answer is finished
    assert done(" 12\n\nAnswer 3:")  # an answer to a question that was not asked
    assert done(" 12\n\nmore\n\n")  # two blocks without a marker: off the format
