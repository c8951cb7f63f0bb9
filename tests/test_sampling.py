"""`ica_weight_mode="sampling"`: the weights choose which rows are drawn, the loss stays the stock one."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from testing_utils import CPU_ARGS, WEIGHT_ATOL, assert_trains_like, chat_row, dpo_pairs, stock_and_ica_sft, tiny_llama

from trl_ica import ICADPOConfig, ICADPOTrainer, ICASFTConfig, ICASFTTrainer
from trl_ica.trainer.sampling import WeightedEpochSampler, epoch_order, steps_per_epoch, systematic_counts

COMMON = dict(CPU_ARGS, dataloader_drop_last=False, ica_demo_selection="fixed")


def data(n=12):
    train = Dataset.from_list(
        [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 3)) for i in range(n)]
    )
    holdout = Dataset.from_list([chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(5)])
    return train, holdout


def model_for(tokenizer):
    return tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def sampling_trainer(tokenizer, folder, **fields):
    train, holdout = data()
    settings = {**COMMON, "per_device_train_batch_size": 2, "max_steps": 4, "ica_weight_mode": "sampling", **fields}
    return ICASFTTrainer(
        model_for(tokenizer),
        args=ICASFTConfig(output_dir=str(folder), **settings),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )


def trained_rows(folder) -> list[tuple[int, int]]:
    """(step, ica_index) of every row trained, from the run's `ica/weights.jsonl`."""
    return [(r["step"], r["ica_index"]) for r in map(json.loads, open(folder / "ica" / "weights.jsonl"))]


def force_pool_weights(trainer, weights, monkeypatch):
    """Make the run's weighting give every training row `weights` (by `ica_index`), to the sampler and to each step."""
    from trl_ica.trainer.weigher import StepWeights

    class Forced:
        def pool(self, state):
            return np.asarray(weights, dtype=np.float64)

        def __call__(self, scores, indices, step, state, units=None):
            indices = np.asarray(indices)
            units = np.ones(len(indices)) if units is None else np.asarray(units, dtype=np.float64)
            return StepWeights(indices, scores, units, self.pool(state)[indices], slice(None))

    monkeypatch.setattr(trainer.ica, "weigher", Forced())


def test_systematic_counts_stay_within_one_draw_of_the_expectation():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        weights = rng.random(n) * (rng.random(n) > 0.3)
        if not weights.any():
            continue
        draws = int(rng.integers(1, 3 * n + 1))
        counts = systematic_counts(weights, draws, float(rng.random()))
        expected = draws * weights / weights.sum()
        assert counts.sum() == draws
        assert np.all(counts >= np.floor(expected) - 1e-9) and np.all(counts <= np.ceil(expected) + 1e-9)
        assert np.all(counts[weights == 0] == 0)
    # equal weights: every row once, whatever the offset (including the largest float below 1)
    for offset in (0.0, 0.5, np.nextafter(1.0, 0.0)):
        assert systematic_counts(np.full(10, 0.3), 10, offset).tolist() == [1] * 10


def test_unit_weights_give_the_stock_samplers_order():
    """The stock order is `torch.randperm(n)` from a generator seeded `seed + epoch` (accelerate's seedable
    sampler); equal weights must give exactly it, epoch by epoch."""
    for epoch in range(3):
        generator = torch.Generator()
        generator.manual_seed(42 + epoch)
        assert epoch_order(np.ones(17), 42, epoch) == torch.randperm(17, generator=generator).tolist()
    assert epoch_order(np.ones(17), 42, 0) != epoch_order(np.ones(17), 42, 1)


def test_a_refresh_redraws_the_rest_of_the_epoch_from_the_new_weights():
    state = {"weights": np.ones(12), "version": 0}
    opened = []

    def before_step(step):
        opened.append(step)
        if step == 2:  # a scoring at step 2 zeroes the first half
            state["weights"], state["version"] = np.r_[np.zeros(6), np.ones(6)], 1

    sampler = WeightedEpochSampler(12, lambda: (state["weights"], state["version"]), 7, 4, before_step, 3)
    drawn = list(sampler)
    assert opened == [0, 1, 2]  # 12 rows, 4 a step: the sampler opens steps 0-2 before drawing their rows
    old, new = epoch_order(np.ones(12), 7, 0), epoch_order(np.r_[np.zeros(6), np.ones(6)], 7, 0)
    assert drawn == old[:8] + new[8:]
    assert all(i >= 6 for i in drawn[8:])
    assert sampler.epoch == 1


def test_unit_weights_reproduce_sfttrainer_over_epochs(tokenizer, tmp_path):
    """Weights all 1: the same rows in the same order over several epochs (the last step of each partial), the
    same losses and bit-identical parameters as stock SFTTrainer."""
    train, holdout = data()
    settings = dict(
        CPU_ARGS,
        seed=3,
        dataloader_drop_last=False,
        max_steps=7,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
    )
    unit = dict(ica_weight_mode="sampling", ica_weighting="none", ica_demo_selection="fixed")
    stock, ours = stock_and_ica_sft(tokenizer, tmp_path, train, holdout, settings, unit)
    assert stock.state.epoch > 2  # three epochs of 3 steps each (the third step of each has one micro-batch)
    assert_trains_like(stock, ours)


def test_rows_of_weight_zero_are_never_drawn_and_batches_stay_full(tokenizer, tmp_path, monkeypatch):
    trainer = sampling_trainer(tokenizer, tmp_path, max_steps=12, ica_weighting="holdout_quantile")
    weights = np.where(np.arange(12) % 2 == 1, 0.5, 0.0)  # only the odd rows keep weight
    force_pool_weights(trainer, weights, monkeypatch)
    trainer.train()
    rows = trained_rows(tmp_path)
    assert len(rows) == 12 * 2  # 12 steps of 2 rows: every batch full
    counts = np.bincount([i for _, i in rows], minlength=12)
    assert counts[::2].sum() == 0
    assert counts[1::2].tolist() == [4] * 6  # 2 epochs, each row of weight 0.5 drawn twice per epoch
    # the loss is the stock one: every row of every step weighted 1, while the log keeps the sampling weights
    assert set(trainer.ica._step_weights.values()) == {1.0}
    logged = [json.loads(line)["weight"] for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert set(logged) == {0.5}


def test_sampling_follows_the_scores(tokenizer, tmp_path):
    """With real scores, rows are drawn about as often as their weights say over the run."""
    trainer = sampling_trainer(tokenizer, tmp_path, max_steps=30, ica_weighting="global_minmax", learning_rate=0.0)
    trainer.train()
    weights = trainer.ica.pool_weights()[0]
    counts = np.bincount([i for _, i in trained_rows(tmp_path)], minlength=12)
    epochs = 30 * 2 / 12
    expected = epochs * 12 * weights / weights.sum()
    # systematic resampling: each epoch draws a row the floor or the ceiling of its expectation
    assert np.all(np.abs(counts - expected) <= epochs + 1e-9), (counts, expected)
    assert counts[np.argmin(weights)] == 0 and weights.min() == 0


def test_too_few_rows_with_weight_is_an_error_that_counts_them(tokenizer, tmp_path, monkeypatch):
    trainer = sampling_trainer(tokenizer, tmp_path, ica_weighting="holdout_quantile", gradient_accumulation_steps=2)
    force_pool_weights(trainer, np.r_[np.ones(3), np.zeros(9)], monkeypatch)
    with pytest.raises(ValueError, match="3 of 12 training rows kept a weight above 0, fewer than the 4 rows"):
        trainer.train()
    trainer = sampling_trainer(tokenizer, tmp_path / "zero", ica_weighting="holdout_quantile")
    force_pool_weights(trainer, np.zeros(12), monkeypatch)
    with pytest.raises(ValueError, match="0 of 12 training rows kept"):
        trainer.train()
    # a training set smaller than one step: every row kept fills it once, as the stock sampler would
    small = WeightedEpochSampler(6, lambda: (np.ones(6), 0), seed=0, step_rows=8)
    assert sorted(small) == list(range(6))
    with pytest.raises(ValueError, match="5 of 6 training rows kept a weight above 0, fewer than the 8 rows"):
        list(WeightedEpochSampler(6, lambda: (np.r_[np.ones(5), 0.0], 0), seed=0, step_rows=8))


def test_resume_mid_epoch_after_a_refresh_draws_the_same_rows(tokenizer, tmp_path):
    """A refresh at step 5 redraws the rest of epoch 0; a run resumed from step 8 (mid-epoch 1) trains the same rows
    in the same steps as the uninterrupted run."""
    settings = dict(
        max_steps=10,
        ica_refresh=2,
        ica_weighting="holdout_quantile",
        learning_rate=5e-2,
        save_strategy="steps",
        save_steps=4,
    )
    sampling_trainer(tokenizer, tmp_path / "full", **settings).train()
    sampling_trainer(tokenizer, tmp_path / "cut", **settings).train()
    resumed = sampling_trainer(tokenizer, tmp_path / "cut", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))
    full = trained_rows(tmp_path / "full")
    assert trained_rows(tmp_path / "cut") == full and len(full) == 20
    first = [json.loads(line) for line in open(tmp_path / "full" / "ica" / "refresh-1.jsonl")]
    assert first[0]["step"] == 5


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(ica_weighting="batch_minmax"), "compares the rows of one batch"),
        (dict(ica_refresh="online", ica_weighting="holdout_quantile"), "scores rows only once they are drawn"),
        (dict(packing=True), "packed sequences"),
        (dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy` is 'group_by_length'"),
        (dict(ica_loss_reduction="weighted_mean"), "the loss is the stock one"),
        (dict(ica_weight_mode="shuffle"), "`ica_weight_mode` must be one of \\['loss', 'sampling'\\], got 'shuffle'"),
    ],
)
def test_what_sampling_cannot_use_is_refused_by_name(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        ICASFTConfig(output_dir=str(tmp_path), **{**COMMON, "ica_weight_mode": "sampling", **fields})


def test_a_streamed_training_set_is_refused(tokenizer, tmp_path):
    train, holdout = data()
    stream = IterableDataset.from_generator(lambda: iter(train))
    args = ICASFTConfig(output_dir=str(tmp_path), ica_weight_mode="sampling", max_steps=2, **COMMON)
    with pytest.raises(ValueError, match="IterableDataset"):
        ICASFTTrainer(
            model_for(tokenizer), args=args, train_dataset=stream, processing_class=tokenizer, holdout_dataset=holdout
        )


def test_pairs_sample_with_the_default_weighting(tokenizer, tmp_path):
    """Under sampling an unset weighting is the posterior for pairs too; DPO trains full batches of drawn pairs."""
    train, holdout = dpo_pairs(8)
    model = model_for(tokenizer)
    ref = tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).eval()
    args = ICADPOConfig(
        output_dir=str(tmp_path),
        **{**COMMON, "ica_weight_mode": "sampling", "max_steps": 3, "per_device_train_batch_size": 2},
    )
    assert args.ica_weighting == "holdout_posterior"
    trainer = ICADPOTrainer(
        model, ref, args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout
    )
    trainer.train()
    assert len(trained_rows(tmp_path)) == 6 and set(trainer.ica._step_weights.values()) == {1.0}


def test_steps_per_epoch_counts_as_the_trainer_does():
    assert steps_per_epoch(12, 2, 1, 2, False) == 3  # 6 micro-batches, 2 per step
    assert steps_per_epoch(13, 2, 1, 2, False) == 4  # 7 micro-batches: the last step has one
    assert steps_per_epoch(13, 2, 1, 2, True) == 3
    assert steps_per_epoch(13, 2, 2, 1, False) == 4  # 4 micro-batches per process (the last padded)


def test_holdout_posterior_weights_each_loss_from_the_whole_training_set(tokenizer, tmp_path):
    """`ica_weighting="holdout_posterior"` in the default loss mode: each step's rows get the weights the scheme gives
    them against the holdout's own scores and every training row's."""
    from trl_ica.scoring.weighting import compute_weights

    trainer = sampling_trainer(
        tokenizer, tmp_path, ica_weight_mode="loss", ica_weighting="holdout_posterior", max_steps=6
    )
    # training scores spread across the holdout's own, so that the weights vary
    trainer.ica._score_reference(trainer.model, 0)
    reference = trainer.ica.state.reference
    spread = reference.max() - reference.min()
    trainer.ica.use_scores(np.linspace(reference.min() - spread, reference.max(), 12), "test scores")
    trainer.train()
    state = trainer.ica.state
    logged = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    index = np.array([r["ica_index"] for r in logged])
    expected = compute_weights(state.scores[index], "holdout_posterior", reference=state.reference, pool=state.scores)
    np.testing.assert_allclose([r["weight"] for r in logged], expected, rtol=0, atol=WEIGHT_ATOL)
    assert len(logged) == 12 and len(set(np.round(expected, 6))) > 3  # the weights vary: the check compares something
