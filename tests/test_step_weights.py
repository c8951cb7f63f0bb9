"""ICA weights are computed over every example of an optimizer step, however the step is split.

Sixteen rows trained for one step as 16 x 1, 4 x 4 and 1 x 16 (per-device batch x gradient accumulation) must get
the same weights, and (plain SGD, so the update is linear in the gradient) the same parameters after the step.
The two-process split (2 x 2 x 4) is in test_distributed.py.
"""

import json

import numpy as np
import pytest
import torch
from conftest import STEP_ROWS, step_trainer

SPLITS = [(16, 1), (4, 4), (1, 16)]


def _weights(folder):
    with open(folder / "ica" / "weights.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["ica_index"]: r["weight"] for r in rows}, len(rows)


@pytest.mark.parametrize("refresh", [1, "online"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_one_step_gets_the_same_weights_and_update_however_it_is_split(tokenizer, tmp_path, kind, refresh):
    runs = []
    for batch, accumulation in SPLITS:
        folder = tmp_path / f"{batch}x{accumulation}"
        trainer = step_trainer(kind, tokenizer, folder, batch, accumulation, ica_refresh=refresh)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        weights, records = _weights(folder)
        assert records == STEP_ROWS and sorted(weights) == list(range(STEP_ROWS))  # one record per example of the step
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs.append((weights, before, after))
    reference, before, after = runs[0]
    values = np.array([reference[i] for i in range(STEP_ROWS)])
    # Min-max over the 16 rows of the step: exactly one 0 and one 1, the rest in between
    assert np.isclose(values, 0).sum() == 1 and np.isclose(values, 1).sum() == 1
    moved = max((after[n] - before[n]).abs().max().item() for n in before)
    assert moved > 1e-3  # the step changed the parameters, so equal results below mean something
    for (batch, accumulation), (weights, _, params) in zip(SPLITS[1:], runs[1:]):
        # Online at 16 x 1, log p(y | x) comes from the training forward, elsewhere from the engine: fp32 apart
        split = f"{batch}x{accumulation}"
        np.testing.assert_allclose([weights[i] for i in range(STEP_ROWS)], values, atol=1e-5, err_msg=split)
        for name in after:
            torch.testing.assert_close(params[name], after[name], atol=1e-5, rtol=1e-4, msg=f"{split} {name}")


def test_a_step_of_one_example_is_refused_under_a_batch_scheme(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        step_trainer("sft", tokenizer, tmp_path, 1, 1)
    step_trainer("sft", tokenizer, tmp_path, 1, 1, ica_weighting="global_minmax")  # weighs each row on its own


def test_a_last_step_of_one_example_is_weighted_against_all_scores(tokenizer, tmp_path, caplog):
    """17 rows in steps of 4 x 4: the last step holds one row, weighted by min-max over the whole set's scores."""
    trainer = step_trainer("sft", tokenizer, tmp_path, 4, 4, extra_rows=1, max_steps=-1, num_train_epochs=1)
    with caplog.at_level("WARNING"):
        trainer.train()
    with open(tmp_path / "ica" / "weights.jsonl") as f:
        rows = [json.loads(line) for line in f]
    last = [r for r in rows if r["step"] == 1]
    assert len(rows) == STEP_ROWS + 1 and len(last) == 1 and "single example" in caplog.text
    low, high = trainer.ica.global_range
    assert last[0]["weight"] == pytest.approx(np.clip((last[0]["score"] - low) / (high - low), 0, 1))
