"""ICA weights are computed over every example of an optimizer step, however the step is split.

Sixteen rows trained for one step as 16 x 1, 4 x 4 and 1 x 16 (per-device batch x gradient accumulation) must get
the same weights, and (plain SGD, so the update is linear in the gradient) the same parameters after the step.
The two-process split (2 x 2 x 4) is in test_distributed.py. Online, each step is weighted with the model of that
step, and the first step trains as with one scoring before training.
"""

import json

import numpy as np
import pytest
import torch
from testing_utils import GRAD_TOL, LOGP_ATOL, STEP_ROWS, minmax_weight_atol, step_trainer

SPLITS = [(16, 1), (4, 4), (1, 16)]


def _weights(folder):
    """`(weights, scores, records)` of a one-step run: by example index, and the number of records."""
    with open(folder / "ica" / "weights.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["ica_index"]: r["weight"] for r in rows}, {r["ica_index"]: r["score"] for r in rows}, len(rows)


@pytest.mark.parametrize("refresh", [1, "online"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_one_step_gets_the_same_weights_and_update_however_it_is_split(tokenizer, tmp_path, kind, refresh):
    runs = []
    for batch, accumulation in SPLITS:
        folder = tmp_path / f"{batch}x{accumulation}"
        trainer = step_trainer(kind, tokenizer, folder, batch, accumulation, ica_refresh=refresh)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        weights, scores, records = _weights(folder)
        assert records == STEP_ROWS and sorted(weights) == list(range(STEP_ROWS))  # one record per example of the step
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs.append((weights, scores, before, after))
    reference, reference_scores, before, after = runs[0]
    values = np.array([reference[i] for i in range(STEP_ROWS)])
    score_values = [reference_scores[i] for i in range(STEP_ROWS)]
    # A summed difference score; a pair's is two of them (chosen and rejected)
    score_atol = LOGP_ATOL if kind == "sft" else 2 * LOGP_ATOL
    # Min-max over the 16 rows of the step: exactly one 0 and one 1, the rest in between
    assert np.isclose(values, 0).sum() == 1 and np.isclose(values, 1).sum() == 1
    moved = max((after[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-3  # the step changed the parameters, so equal results below mean something
    for (batch, accumulation), (weights, scores, _, params) in zip(SPLITS[1:], runs[1:]):
        # Online at 16 x 1, log p(y | x) comes from the training forward, elsewhere from the engine: fp32 apart, and
        # min-max divides that difference by the step's score range
        split = f"{batch}x{accumulation}"
        np.testing.assert_allclose([scores[i] for i in range(STEP_ROWS)], score_values, atol=score_atol, err_msg=split)
        weight_atol = minmax_weight_atol(score_values, score_atol)
        np.testing.assert_allclose([weights[i] for i in range(STEP_ROWS)], values, atol=weight_atol, err_msg=split)
        for name in after:
            torch.testing.assert_close(params[name], after[name], **GRAD_TOL, msg=f"{split} {name}")


def test_a_step_of_one_example_is_refused_under_a_batch_scheme(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        step_trainer("sft", tokenizer, tmp_path, 1, 1)
    for scheme in ("global_minmax", "holdout_quantile"):  # they weigh each row on its own
        step_trainer("sft", tokenizer, tmp_path, 1, 1, ica_weighting=scheme)


def test_a_last_step_of_one_example_is_weighted_against_all_scores(tokenizer, tmp_path, caplog):
    """17 rows in steps of 4 x 4: the last step holds one row, weighted by min-max over the whole set's scores."""
    trainer = step_trainer("sft", tokenizer, tmp_path, 4, 4, extra_rows=1, max_steps=-1, num_train_epochs=1)
    with caplog.at_level("WARNING"):
        trainer.train()
    with open(tmp_path / "ica" / "weights.jsonl") as f:
        rows = [json.loads(line) for line in f]
    last = [r for r in rows if r["step"] == 1]
    assert len(rows) == STEP_ROWS + 1 and len(last) == 1 and "single example" in caplog.text
    low, high = trainer.ica.state.global_range
    assert last[0]["weight"] == pytest.approx(np.clip((last[0]["score"] - low) / (high - low), 0, 1))


def _naive_score(builder, model, i):
    from reference import naive_log_prob

    cond = [naive_log_prob(model, r) for r in builder.requests(i, True)]
    plain = [naive_log_prob(model, r) for r in builder.requests(i, False)]
    return cond[0] - plain[0] if len(cond) == 1 else (cond[0] - cond[1]) - (plain[0] - plain[1])


@pytest.mark.parametrize(("kind", "cutoff"), [("sft", 1.0), ("dpo", 1.0), ("simpo", 1.0), ("sft", 0.3)])
def test_holdout_quantile_weights_each_row_against_the_holdouts_own_scores(tokenizer, tmp_path, kind, cutoff):
    trainer = step_trainer(
        kind, tokenizer, tmp_path, 4, 1, max_steps=2, ica_weighting="holdout_quantile", ica_holdout_cutoff=cutoff
    )
    model = trainer.model
    reference_model = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    holdout = [json.loads(line) for line in open(tmp_path / "ica" / "holdout-0.jsonl")]
    assert [r["holdout_index"] for r in holdout] == list(range(5))
    assert all(r["holdout_index"] not in r["demo_indices"] for r in holdout)  # no row is its own demonstration
    # The holdout's scores are those of the model before training (the refresh at step 0), computed naively
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reference_model[name])
    reference = np.array([r["score"] for r in holdout])
    naive = [_naive_score(trainer.ica.reference_builder, model, i) for i in range(5)]
    np.testing.assert_allclose(reference, naive, atol=LOGP_ATOL)
    records = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(records) == 8
    expected = [
        min(1.0, np.mean([1.0 if r < s else 0.5 if r == s else 0.0 for r in reference]) / cutoff)
        for s in (x["score"] for x in records)
    ]
    # the same comparisons of the same logged scores, a mean of at most five 0/0.5/1 terms: float64 rounding only
    np.testing.assert_allclose([r["weight"] for r in records], expected, atol=1e-12)


def test_holdout_quantile_needs_preference_pairs_in_a_preference_holdout(tokenizer, tmp_path):
    from testing_utils import step_pair_rows, step_sft_rows, tiny_llama

    from trl_ica import ICADPOConfig, ICADPOTrainer

    args = ICADPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", ica_weighting="holdout_quantile"
    )

    with pytest.raises(ValueError, match="holdout needs `chosen` and `rejected`"):
        ICADPOTrainer(
            tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
            tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
            args=args,
            train_dataset=step_pair_rows()[0],
            processing_class=tokenizer,
            holdout_dataset=step_sft_rows()[1],
        )


@pytest.mark.parametrize("every, scored", [(None, [0, 1, 2]), (2, [0, 2])])
def test_online_holdout_quantile_rescores_the_holdout_every_few_steps(tokenizer, tmp_path, every, scored):
    """By default the holdout is rescored at every online step, so each step's rows meet holdout scores of the
    same model; `ica_holdout_rescore_steps` spaces the scorings out."""
    fields = {} if every is None else {"ica_holdout_rescore_steps": every}
    trainer = step_trainer(
        "sft",
        tokenizer,
        tmp_path,
        4,
        1,
        max_steps=3,
        ica_refresh="online",
        ica_weighting="holdout_quantile",
        **fields,
    )
    trainer.train()
    steps = [json.loads(open(tmp_path / "ica" / f"holdout-{k}.jsonl").readline())["step"] for k in range(len(scored))]
    assert steps == scored and not (tmp_path / "ica" / f"holdout-{len(scored)}.jsonl").exists()
    assert trainer.ica.state.reference_step == scored[-1]


@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_online_weights_each_step_with_the_model_of_that_step(tokenizer, tmp_path, kind):
    """Online, step 2 is scored with the parameters after step 1: its logged scores and weights equal the naive
    scores of its rows under a one-step run's final model (the same first step), min-maxed over the step."""
    two = step_trainer(kind, tokenizer, tmp_path / "two", 4, 1, max_steps=2, ica_refresh="online")
    two.train()
    one = step_trainer(kind, tokenizer, tmp_path / "one", 4, 1, max_steps=1, ica_refresh="online")
    one.train()
    records = [json.loads(line) for line in open(tmp_path / "two" / "ica" / "weights.jsonl")]
    first = [json.loads(line) for line in open(tmp_path / "one" / "ica" / "weights.jsonl")]
    assert records[:4] == first  # the same first step
    second = [r for r in records if r["step"] == 1]
    assert len(second) == 4
    model = one.model.eval()
    with torch.no_grad():
        naive = np.array([_naive_score(one.ica.builder, model, r["ica_index"]) for r in second])
        moved = np.array([_naive_score(one.ica.builder, model, r["ica_index"]) for r in first])
    tol = 1e-4  # fp32 sums over a few dozen tokens of a tiny model, batched against one at a time
    # The step moved the scores well beyond that tolerance: scores of the stale model would fail it
    assert np.abs(moved - [r["score"] for r in first]).max() > 10 * tol
    np.testing.assert_allclose([r["score"] for r in second], naive, atol=tol)
    expected = (naive - naive.min()) / (naive.max() - naive.min())  # min-max moves by <= 2 tol / range per end
    np.testing.assert_allclose([r["weight"] for r in second], expected, atol=3 * tol / np.ptp(naive))


@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_online_and_one_scoring_train_the_first_step_alike(tokenizer, tmp_path, kind):
    """At the first step the model is the one scored before training, so online weights, and the update they give,
    equal those of `ica_refresh=1`: the online path applies the weights it logs."""
    runs = []
    for refresh in (1, "online"):
        trainer = step_trainer(kind, tokenizer, tmp_path / str(refresh), 16, 1, ica_refresh=refresh)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        with open(tmp_path / str(refresh) / "ica" / "weights.jsonl") as f:
            rows = sorted((json.loads(line) for line in f), key=lambda r: r["ica_index"])
        logged = np.array([[r["score"], r["weight"]] for r in rows])
        runs.append((logged, before, dict(trainer.model.named_parameters())))
    (once, before, after), (online, _, moved) = runs
    assert len(once) == len(online) == STEP_ROWS
    # Online at 16 x 1, log p(y | x) comes from the training forward: fp32 apart from the engine's
    tol = 1e-4
    np.testing.assert_allclose(online[:, 0], once[:, 0], atol=tol)
    np.testing.assert_allclose(online[:, 1], once[:, 1], atol=3 * tol / np.ptp(once[:, 0]))
    assert max((after[n] - before[n]).abs().max().item() for n in before) > 1e-3
    for name in after:
        torch.testing.assert_close(moved[name], after[name], **GRAD_TOL, msg=name)
