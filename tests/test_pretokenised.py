"""Pre-tokenised SFT rows (`input_ids` with `labels`, `completion_mask` or `assistant_masks`): scored on their own
token ids, on exactly the positions SFTTrainer trains on."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import (
    CPU_ARGS,
    LOGP_ATOL,
    assert_requests_are_the_training_sequences,
    assert_trains_like,
    stock_and_ica_sft,
    tiny_llama,
)

from trl_ica import ICASFTConfig, ICASFTTrainer, score_ica
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.trainer.mixin import scoring_view

COMMON = dict(CPU_ARGS, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)


def tokenised(tokenizer, n=12, offset=0, column="completion_mask"):
    """Rows of `input_ids` with a mask over the answer: `completion_mask`, `assistant_masks` or `labels`."""
    rows = []
    for i in range(offset, offset + n):
        prompt = tokenizer(f"What is {i} plus {i + 1}?", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" The answer is {2 * i + 1}.{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
        mask = [0] * len(prompt) + [1] * len(answer)
        ids = prompt + answer
        value = [t if m else -100 for t, m in zip(ids, mask)] if column == "labels" else mask
        rows.append({"input_ids": ids, column: value})
    return Dataset.from_list(rows)


def model_for(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def test_scores_equal_a_naive_forward_of_the_token_ids(tokenizer):
    """log p(answer | prompt) from the row's ids; with demonstrations, the holdout rows' ids before them."""
    train, holdout = tokenised(tokenizer, 3), tokenised(tokenizer, 4, offset=20)
    model = model_for(tokenizer).eval()
    out = score_ica(
        model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, demo_selection="fixed", form="difference", reduction="sum"),
        show_progress=False,
    )
    for row in range(3):
        ids, start = train[row]["input_ids"], train[row]["completion_mask"].index(1)
        demos = [t for j in out.demo_indices[row] for t in holdout[int(j)]["input_ids"]]

        def naive(sequence, first):
            with torch.no_grad():
                logp = model(torch.tensor([sequence])).logits[0].double().log_softmax(-1)
            return float(sum(logp[t - 1, sequence[t]] for t in range(first, len(sequence))))

        assert out.num_tokens[row] == len(ids) - start
        np.testing.assert_allclose(out.logp_unconditioned[row], naive(ids, start), atol=LOGP_ATOL, rtol=0)
        np.testing.assert_allclose(
            out.logp_conditioned[row], naive(demos + ids, len(demos) + start), atol=LOGP_ATOL, rtol=0
        )


@pytest.mark.parametrize(
    ("column", "completion_only_loss"),
    [("completion_mask", True), ("completion_mask", None), ("assistant_masks", None), ("labels", None)],
)
def test_the_positions_scored_are_the_ones_trl_trains_on(tokenizer, tmp_path, column, completion_only_loss):
    """The mask ICA reads equals `labels != -100` of TRL's own prepared dataset (completion_mask counts only under
    `completion_only_loss=True`, as in TRL), and with unit weights the run trains exactly like SFTTrainer."""
    train, holdout = tokenised(tokenizer, column=column), tokenised(tokenizer, 5, offset=20, column=column)
    settings = dict(COMMON, completion_only_loss=completion_only_loss)
    unit = dict(ica_weighting="none", ica_refresh="online")
    stock, ours = stock_and_ica_sft(tokenizer, tmp_path, train, holdout, settings, unit, train_ours=False)
    trained = [[label != -100 for label in row["labels"]][1:] for row in stock.train_dataset]
    view = scoring_view(train, completion_only_loss=stock.completion_only_loss)
    key = "labels" if "labels" in view.column_names else "loss_mask"
    read = [[(v != -100) if key == "labels" else bool(v) for v in row[key]][1:] for row in view]
    assert read == trained  # TRL's label rule, read the same way
    ours.train()
    assert_requests_are_the_training_sequences(ours)  # the training forward is log p(answer | prompt)
    mine = dict(ours.model.named_parameters())
    for name, p in stock.model.named_parameters():
        assert torch.equal(p, mine[name]), name


def test_a_mask_of_several_runs_is_refused_with_the_reason(tokenizer):
    rows = tokenised(tokenizer, 2).to_list()
    rows[1]["completion_mask"] = [0, 1] + [0] * (len(rows[1]["input_ids"]) - 3) + [1]
    with pytest.raises(ValueError, match=r"dataset row 1: the positions that carry loss \(`completion_mask`\) are"):
        options = ICAScoringOptions(num_demos=1, demo_selection="fixed", form="difference", reduction="sum")
        score_ica(
            model_for(tokenizer),
            tokenizer,
            Dataset.from_list(rows),
            tokenised(tokenizer, 4, offset=20),
            options,
            show_progress=False,
        )


def test_rows_prepared_beforehand_train_like_sfttrainer(tokenizer, tmp_path):
    """`dataset_kwargs={"skip_prepare_dataset": True}`: TRL trains the pre-tokenised rows as they are; ICA scores the
    same ids, and with unit weights the run is SFTTrainer's."""
    train, holdout = tokenised(tokenizer, column="labels"), tokenised(tokenizer, 5, offset=20, column="labels")
    settings = dict(COMMON, dataset_kwargs={"skip_prepare_dataset": True})
    stock, ours = stock_and_ica_sft(tokenizer, tmp_path, train, holdout, settings, dict(ica_weighting="none"))
    assert_trains_like(stock, ours)
    scored = ours.ica.builder.requests(0, False)[0]
    row = train[0]
    start = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert list(scored.response) == row["input_ids"][start:]  # the answer's own ids, as the labels mark them


def test_rows_prepared_beforehand_are_weighted(tokenizer, tmp_path):
    train, holdout = tokenised(tokenizer, column="labels"), tokenised(tokenizer, 5, offset=20, column="labels")
    args = ICASFTConfig(
        output_dir=str(tmp_path), dataset_kwargs={"skip_prepare_dataset": True}, ica_weight_mode="loss", **COMMON
    )
    trainer = ICASFTTrainer(
        model_for(tokenizer), args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout
    )
    trainer.train()
    weights = [h["ica/weight_mean"] for h in trainer.state.log_history if "loss" in h]
    assert len(weights) == 3 and all(w < 1 for w in weights)
    with pytest.raises(ValueError, match="already packed"):
        ICASFTConfig(output_dir=str(tmp_path), dataset_kwargs={"skip_prepare_dataset": True}, packing=True)
