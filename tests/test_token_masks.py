"""`ica_token_quantile`: the response tokens that the model with demonstrations finds less likely than the holdout's
own tokens leave the SFT loss."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from reference import naive_token_log_probs
from testing_utils import CPU_ARGS, LOSS_ATOL, TOKEN_LOGP_ATOL, assert_trains_like, chat_row, tiny_llama
from trl import SFTConfig, SFTTrainer

from trl_ica import ICADPOConfig, ICASFTConfig, ICASFTTrainer
from trl_ica.scoring.weighting import token_keep, token_threshold
from trl_ica.trainer.state import ICAState

COMMON = dict(
    CPU_ARGS,
    dataloader_drop_last=False,
    ica_demo_selection="fixed",
    ica_num_demos=2,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    max_steps=3,
)
QUANTILE = 0.2  # high enough that the tiny model's clean-looking rows lose tokens too


def data():
    answers = [f"The answer is {2 * i + 1}." for i in range(8)] + ["Purple elephants sing at dawn."] * 4
    train = Dataset.from_list([chat_row(f"What is {i} plus {i + 1}?", a) for i, a in enumerate(answers)])
    holdout = Dataset.from_list([chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(6)])
    return train, holdout


def model_for(tokenizer):
    return tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def masked_trainer(tokenizer, folder, **fields):
    train, holdout = data()
    args = ICASFTConfig(
        output_dir=str(folder), **{**COMMON, "ica_weighting": "none", "ica_token_quantile": QUANTILE, **fields}
    )
    return ICASFTTrainer(
        model_for(tokenizer), args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout
    )


def loss_tokens(batch) -> list[list[int]]:
    """Each example's loss tokens of a collated batch, in order: the targets of the shifted positions whose label is
    not -100, grouped by example (packed sequences by `seq_idx`)."""
    labels, ids = batch["labels"], batch["input_ids"]
    predicted = labels[:, 1:] != -100
    targets = ids[:, 1:][predicted].tolist()
    owner = (
        batch["seq_idx"][:, 1:][predicted]
        if "seq_idx" in batch
        else torch.arange(len(ids))[:, None].expand_as(predicted)[predicted]
    )
    out = [[] for _ in range(len(batch["ica_index"]))]
    for o, t in zip(owner.tolist(), targets):
        out[o].append(t)
    return out


def test_threshold_is_the_holdouts_token_quantile_and_keep_compares_with_it():
    reference = [np.array([-1.0, -2.0, -3.0], np.float32), np.array([-4.0, -np.inf], np.float32)]
    assert token_threshold(reference, 0.25) == np.quantile([-1.0, -2.0, -3.0, -4.0], 0.25)
    kept = token_keep([np.array([-1.0, -3.25, -3.5]), np.array([])], -3.25)
    assert [k.tolist() for k in kept] == [[True, True, False], []]
    with pytest.raises(ValueError, match="no finite token log-probabilities"):
        token_threshold([np.array([-np.inf])], 0.5)


def test_the_masked_loss_equals_a_naive_reference(tokenizer, tmp_path):
    """The trainer's loss on a batch equals: every training row's response tokens scored by a full forward with its
    demonstrations, the holdout's own tokens scored the same way against the rest of the holdout, tokens under the
    holdout's quantile dropped, the kept tokens' NLL summed and divided by all loss tokens (TRL's divisor)."""
    trainer = masked_trainer(tokenizer, tmp_path)
    model = trainer.model
    rows = [trainer.train_dataset[i] for i in (0, 3, 8, 10)]
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(model.train(), dict(batch))  # scores the training set and the holdout first

    ica = trainer.ica
    model.eval()
    reference = [
        naive_token_log_probs(model, ica.reference_builder.conditioned(i))
        for i in range(len(ica.reference_builder.candidates))
    ]
    threshold = np.quantile(np.concatenate(reference), QUANTILE)
    index = batch["ica_index"].tolist()
    requests = [ica.builder.conditioned(i) for i in index]
    # The scored response tokens are the loss tokens of the training batch, one for one
    assert [list(r.response) for r in requests] == loss_tokens(batch)
    conditioned = [np.array(naive_token_log_probs(model, r)) for r in requests]
    margin = min(np.abs(c - threshold).min() for c in conditioned)
    # no token sits within rounding of the threshold (each side may move by TOKEN_LOGP_ATOL), where it could flip
    assert margin > 10 * TOKEN_LOGP_ATOL
    keep = [c >= threshold for c in conditioned]
    assert 0 < sum(k.sum() for k in keep) < sum(k.size for k in keep)  # some tokens leave, not all

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    nll = -logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    predicted = batch["labels"][:, 1:] != -100
    kept = torch.from_numpy(np.concatenate(keep))
    expected = (nll[predicted] * kept).sum() / predicted.sum()
    assert abs(loss.item() - expected.item()) < LOSS_ATOL


def test_packed_examples_get_their_own_masks(tokenizer, tmp_path):
    trainer = masked_trainer(tokenizer, tmp_path, packing=True, max_length=64)
    rows = [row for row in trainer.train_dataset if len(row["seq_lengths"]) > 1][:2]
    batch = trainer.data_collator(rows)
    assert len(rows) == 2 and len(batch["ica_index"]) > 2  # several examples per packed row
    trainer.compute_loss(trainer.model.train(), dict(batch))
    ica = trainer.ica
    index = batch["ica_index"].tolist()
    assert [list(ica.builder.conditioned(i).response) for i in index] == loss_tokens(batch)
    keep = trainer._token_keep(batch, np.array(index), [len(t) for t in loss_tokens(batch)])
    predicted = batch["labels"][:, 1:] != -100
    expected = np.concatenate(ica.token_masks(index))
    assert keep[predicted].bool().tolist() == expected.tolist() and not expected.all()
    assert bool((keep[~predicted] == 1).all())


def test_a_row_truncated_by_max_length_keeps_the_start_of_its_mask(tokenizer, tmp_path, monkeypatch):
    """Training keeps the first `max_length` tokens of a long row; its loss tokens get the start of its mask. Tokens
    that are not the scored ones stop the step, naming the example."""
    import trl_ica.seams as seams

    trainer = masked_trainer(tokenizer, tmp_path, max_length=20)
    lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(len(trainer.train_dataset))]
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    trainer.compute_loss(trainer.model.train(), dict(batch))
    index = batch["ica_index"].tolist()
    trained = loss_tokens(batch)
    scored = [list(trainer.ica.builder.conditioned(i).response) for i in index]
    assert max(lengths) == 20 and any(len(t) < len(r) for t, r in zip(trained, scored))  # some rows were cut
    assert all(r[: len(t)] == t for t, r in zip(trained, scored))
    keep = trainer._token_keep(batch, np.array(index), [len(t) for t in trained])
    predicted = batch["labels"][:, 1:] != -100
    masks = trainer.ica.token_masks(index)
    assert keep[predicted].bool().tolist() == np.concatenate([m[: len(t)] for m, t in zip(masks, trained)]).tolist()
    scored_ids = trainer._scored_ids
    monkeypatch.setattr(trainer, "_scored_ids", lambda i: scored_ids(i)[1:] + (0,))  # a response one token off
    with pytest.raises(seams.SeamError, match=r"the loss tokens of training examples \(ica_index\) \[0, 1, 2, 3\]"):
        trainer._token_keep(batch, np.array(index), [len(t) for t in trained])


def test_no_token_masked_trains_exactly_like_sfttrainer(tokenizer, tmp_path, monkeypatch):
    train, holdout = data()
    settings = {k: v for k, v in COMMON.items() if not k.startswith("ica_")}
    torch.manual_seed(0)
    stock = SFTTrainer(
        model_for(tokenizer),
        args=SFTConfig(str(tmp_path / "a"), **settings),
        train_dataset=train,
        processing_class=tokenizer,
    )
    stock.train()
    torch.manual_seed(0)
    ours = masked_trainer(tokenizer, tmp_path / "b")
    monkeypatch.setattr(ours.ica, "token_threshold", lambda: -np.inf)  # every token kept: masks of ones
    ours.train()
    assert_trains_like(stock, ours)
    assert [h["ica/masked_token_share"] for h in ours.state.log_history if "loss" in h] == [0.0] * 3


def test_a_run_logs_its_masked_share_and_resumes_with_its_tokens(tokenizer, tmp_path):
    trainer = masked_trainer(tokenizer, tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    shares = [h["ica/masked_token_share"] for h in trainer.state.log_history if "loss" in h]
    assert len(shares) == 2 and all(0 < s < 1 for s in shares)
    saved = trainer.ica.state
    resumed = masked_trainer(tokenizer, tmp_path, save_strategy="steps", save_steps=2, max_steps=3)
    resumed.ica.resume(str(tmp_path / "checkpoint-2"))
    for before, after in (
        (saved.tokens, resumed.ica.state.tokens),
        (saved.reference_tokens, resumed.ica.state.reference_tokens),
    ):
        assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))
    assert resumed.ica.token_threshold() == trainer.ica.token_threshold()


def test_state_without_token_masks_saves_and_loads_none(tmp_path):
    state = ICAState.empty(3)
    state.save(str(tmp_path), 0, np.zeros((3, 1), np.int64), {"x": "1"})
    loaded, _ = ICAState.load(str(tmp_path), {"x": "1"}, with_reference=True)
    assert loaded.tokens is None and loaded.reference_tokens is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(ica_token_quantile=0), r"must be None or a number in \(0, 1\), got 0"),
        (dict(ica_token_quantile=1.5), r"must be None or a number in \(0, 1\), got 1.5"),
        (dict(ica_token_quantile=0.01, ica_refresh="online"), "online scoring does not do"),
        (dict(ica_token_quantile=0.01, ica_score_span="last_line"), "scores only a span"),
        (dict(ica_token_quantile=0.01, ica_scores_file="scores.jsonl"), "does not hold"),
        (dict(ica_token_quantile=0.01, ica_preset="paper"), "`ica_score_end_token=False` leaves that token unscored"),
    ],
)
def test_what_token_masks_cannot_use_is_refused_by_name(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        ICASFTConfig(output_dir=str(tmp_path), use_cpu=True, **fields)


def test_preference_pairs_refuse_token_masks(tmp_path):
    with pytest.raises(ValueError, match="preference losses compare whole responses"):
        ICADPOConfig(output_dir=str(tmp_path), use_cpu=True, ica_token_quantile=0.01)
