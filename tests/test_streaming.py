"""A streamed `train_dataset` (a `datasets.IterableDataset`) is weighted online, step by step as its rows arrive.

With the learning rate at 0 the model never changes, so each row's online score and `holdout_quantile` weight
depend on the row alone: the streamed run must give every row the score and weight the same run on the Dataset
gives it (the Dataset path is checked against naive references elsewhere).
"""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import CPU_ARGS, REGROUPED_ATOL, WEIGHT_ATOL, chat_row, minmax_weight_atol, tiny_llama

from trl_ica import ICASFTConfig, ICASFTTrainer
from trl_ica.scoring.options import ICAScoringOptions

COMMON = dict(
    CPU_ARGS,
    per_device_train_batch_size=4,
    max_steps=3,
    max_length=128,
    ica_refresh="online",
    ica_weighting="holdout_quantile",
    ica_num_demos=2,
)


def data():
    train = [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1 + (i % 3 == 0)}.") for i in range(12)]
    holdout = [chat_row(f"What is {i} plus 5?", f"The answer is {i + 5}.") for i in range(5)]
    return Dataset.from_list(train), Dataset.from_list(holdout)


def trainer(tokenizer, folder, train, holdout, seed=0, **fields):
    model = tiny_llama(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    config = ICASFTConfig(str(folder), **{**COMMON, **fields})
    return ICASFTTrainer(model, args=config, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout)


def logged(folder):
    rows = [json.loads(line) for line in open(folder / "ica" / "weights.jsonl")]
    return {r["ica_index"]: (r["score"], r["weight"]) for r in rows}, rows


@pytest.mark.parametrize("selection", ["fixed", "random"])
def test_streamed_rows_get_the_scores_and_weights_of_the_same_rows_in_a_dataset(tokenizer, tmp_path, selection):
    train, holdout = data()
    runs = {}
    for name, dataset in (("dataset", train), ("streamed", train.to_iterable_dataset())):
        run = trainer(tokenizer, tmp_path / name, dataset, holdout, learning_rate=0.0, ica_demo_selection=selection)
        run.train()
        runs[name] = logged(tmp_path / name)
    streamed, records = runs["streamed"]
    assert len(records) == 12 and sorted(streamed) == list(range(12))  # 3 steps x 4 rows, each row once
    assert [r["ica_index"] for r in records] == list(range(12))  # a stream is trained in its own order
    reference, _ = runs["dataset"]
    for i, (score, weight) in streamed.items():
        assert score == pytest.approx(reference[i][0], abs=REGROUPED_ATOL), i
        assert weight == pytest.approx(reference[i][1], abs=WEIGHT_ATOL), i
    assert len({w for _, w in streamed.values()}) > 1  # the weights differ between rows, so equality means something


def test_a_stream_at_the_default_settings_scores_each_row_as_it_arrives(tokenizer, tmp_path):
    """No `ica_*` field set: a streamed run weights each row's loss (the preset's sampling needs a sampler), and
    scores each row once, when its step comes, as an online run does."""
    train, holdout = data()
    runs = {}
    for name, fields in (("default", {}), ("online", {"ica_refresh": "online"})):
        model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        settings = {k: v for k, v in COMMON.items() if not k.startswith("ica_")}
        config = ICASFTConfig(str(tmp_path / name), learning_rate=0.1, **settings, **fields)
        run = ICASFTTrainer(
            model,
            args=config,
            train_dataset=train.to_iterable_dataset(),
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
        # the preset's sampling needs a sampler, which a stream does not use: the loss is weighted, and why is kept
        assert (config.ica_weight_mode, config.ica_weighting) == ("loss", "holdout_quantile")
        if name == "default":
            assert "IterableDataset" in config.ica_weight_mode_reason
        run.train()
        runs[name] = logged(tmp_path / name)[1]
    assert [r["ica_index"] for r in runs["default"]] == list(range(12))  # each row scored once, at its step
    for a, b in zip(runs["default"], runs["online"], strict=True):
        assert a["step"] == b["step"] and a["score"] == pytest.approx(b["score"], abs=REGROUPED_ATOL)
        assert a["weight"] == pytest.approx(b["weight"], abs=WEIGHT_ATOL)
    assert len({r["weight"] for r in runs["default"]}) > 1


def test_a_stream_scores_whole_responses_under_auto(tokenizer, tmp_path):
    """`ica_score_span="auto"` needs every row checked up front: a stream's rows are scored whole, with a warning."""
    train, holdout = data()
    with pytest.warns(UserWarning, match="rows that stream in cannot be checked"):
        run = trainer(tokenizer, tmp_path, train.to_iterable_dataset(), holdout, ica_score_span="auto")
    assert run.ica.builder.options.span is None


def test_a_streamed_run_trains_with_its_weights(tokenizer, tmp_path):
    train, holdout = data()
    run = trainer(tokenizer, tmp_path, train.to_iterable_dataset(), holdout, learning_rate=0.1)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.train()
    assert any(not torch.equal(before[n], p) for n, p in run.model.named_parameters())
    _, records = logged(tmp_path)
    assert [r["step"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    assert np.isfinite([r["score"] for r in records]).all()


def test_a_streamed_dataset_is_refused_where_it_cannot_be_weighted(tokenizer, tmp_path):
    train, holdout = data()
    stream = train.to_iterable_dataset()
    with pytest.raises(ValueError, match=r"`ica_refresh`=2 rescores every row that many times. Use `ica_refresh=1`"):
        trainer(tokenizer, tmp_path, stream, holdout, ica_refresh=2)
    with pytest.raises(ValueError, match="`ica_weighting='holdout_posterior'` compares a row's score with every"):
        trainer(tokenizer, tmp_path, stream, holdout, ica_refresh=1, ica_weighting="holdout_posterior")
    with pytest.raises(ValueError, match="`demo_selection` must be one of \\['fixed', 'random', 'knn'\\]"):
        trainer(tokenizer, tmp_path, stream, holdout, ica_demo_selection="knn_grouped")
    with pytest.raises(ValueError, match="packed rows needs a Dataset"):
        trainer(tokenizer, tmp_path, stream, holdout, packing=True)


def test_streamed_knn_embeds_the_holdout_once_and_chooses_the_demonstrations_of_the_whole_set(tokenizer):
    """Rows that arrive a few at a time get the nearest holdout rows they get all at once (a row that is also a
    holdout row kept out of its own, as a Dataset's scoring does), and the holdout is embedded with the first rows
    only (not again at every step)."""
    from trl_ica.scoring.ica import prepare_ica
    from trl_ica.scoring.streamed import prepare_streamed_ica

    calls = []

    def embed(texts):  # deterministic: letter counts
        calls.append(len(texts))
        return np.array([[t.count(c) + 0.1 for c in "0123456789 ?"] for t in texts], dtype=np.float64)

    train, holdout = data()
    options = ICAScoringOptions(num_demos=2, demo_selection="knn", embedding_model=embed)
    model = tiny_llama(vocab_size=len(tokenizer))
    builder = prepare_streamed_ica(model, tokenizer, holdout, options)
    with pytest.warns(UserWarning, match=r"1 of 4 training examples also appear in the holdout \(rows \[0\]\)"):
        for start in range(0, 12, 4):
            builder.add(range(start, start + 4), [train[i] for i in range(start, start + 4)])
    assert calls == [5, 4, 4, 4]  # the holdout once, then each step's new rows
    with pytest.warns(UserWarning, match="also appear in the holdout"):
        whole = prepare_ica(model, tokenizer, train, holdout, options, show_progress=False).demo_indices
    np.testing.assert_array_equal(builder.demo_indices, whole)
    assert 4 not in builder.demo_indices[4]  # training row 4 is holdout row 4


def test_streamed_pairs_at_the_defaults_are_scored_as_they_arrive_by_the_model_of_their_step(tokenizer, tmp_path):
    """A DPO run on a stream of pairs with no `ica_*` field set scores each pair once, at its step: with the
    learning rate at 0 (the model never changes) every pair gets the score `score_ica` gives it by hand at its own
    defaults, and each step's weights are its pairs' batch min-max (DPO's default weighting)."""
    from testing_utils import dpo_pairs

    from trl_ica import ICADPOConfig, ICADPOTrainer, score_ica

    train, holdout = dpo_pairs(12)
    settings = {k: v for k, v in COMMON.items() if not k.startswith("ica_")}
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    ref = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).eval()
    config = ICADPOConfig(str(tmp_path), learning_rate=0.0, **settings)
    run = ICADPOTrainer(
        model,
        ref,
        args=config,
        train_dataset=train.to_iterable_dataset(),
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )
    run.train()
    _, records = logged(tmp_path)
    assert [r["ica_index"] for r in records] == list(range(12))  # each pair scored once, at its step, in order
    assert [r["step"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    # score_ica at its defaults: the same score the trainer's defaults define
    by_hand = score_ica(
        tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        tokenizer,
        train,
        holdout,
        show_progress=False,
    ).scores
    np.testing.assert_allclose([r["score"] for r in records], by_hand, atol=REGROUPED_ATOL, rtol=0)
    for step in range(3):
        scores = by_hand[4 * step : 4 * step + 4]
        expected = (scores - scores.min()) / (scores.max() - scores.min())
        got = [r["weight"] for r in records[4 * step : 4 * step + 4]]
        np.testing.assert_allclose(got, expected, atol=minmax_weight_atol(scores, REGROUPED_ATOL), rtol=0)


def test_a_stream_of_pairs_is_refused_by_simpo_and_a_stream_of_the_wrong_kind_by_name(tokenizer, tmp_path):
    from testing_utils import dpo_pairs

    from trl_ica import ICACPOTrainer, ICADPOConfig, ICADPOTrainer, ICASimPOConfig

    pairs, holdout = dpo_pairs(8)
    settings = {k: v for k, v in COMMON.items() if not k.startswith("ica_")}
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"ICACPOTrainer does not train on a streamed `train_dataset`"):
        ICACPOTrainer(
            model,
            args=ICASimPOConfig(str(tmp_path), **settings),
            train_dataset=pairs.to_iterable_dataset(),
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    single, _ = data()
    with pytest.raises(ValueError, match=r"`train_dataset` streams single responses, but ICADPOTrainer trains on"):
        ICADPOTrainer(
            model,
            model,
            args=ICADPOConfig(str(tmp_path), **settings),
            train_dataset=single.to_iterable_dataset(),
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
