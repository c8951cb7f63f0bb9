"""Packing (`packing=True`, TRL's `bfd`): every packed sequence keeps its example's weight."""

import pytest
import torch
from datasets import Dataset
from testing_utils import CPU_ARGS, chat_row, force_weights, tiny_llama
from trl import SFTConfig, SFTTrainer

from trl_ica import ICASFTConfig, ICASFTTrainer

COMMON = dict(CPU_ARGS, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, max_length=64)


def data():
    train = Dataset.from_list(
        [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 3)) for i in range(12)]
    )
    return train, Dataset.from_list([chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(5)])


def model_for(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def test_packed_ica_with_unit_weights_trains_exactly_like_packed_sftrainer(tokenizer, tmp_path):
    train, holdout = data()
    torch.manual_seed(0)
    stock = SFTTrainer(
        model_for(tokenizer),
        args=SFTConfig(str(tmp_path / "a"), packing=True, **COMMON),
        train_dataset=train,
        processing_class=tokenizer,
    )
    stock.train()
    torch.manual_seed(0)
    args = ICASFTConfig(str(tmp_path / "b"), packing=True, ica_weighting="none", ica_refresh="online", **COMMON)
    ours = ICASFTTrainer(
        model_for(tokenizer), args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout
    )
    assert len(ours.train_dataset) < len(train)  # rows were packed together
    for a, b in zip(stock.train_dataset, ours.train_dataset, strict=True):  # TRL's packing, kept as it is
        assert (a["input_ids"], a["labels"], a["seq_lengths"]) == (b["input_ids"], b["labels"], b["seq_lengths"])
    ours.train()
    mine = dict(ours.model.named_parameters())
    for name, p in stock.model.named_parameters():
        assert torch.equal(p, mine[name]), name


def test_each_packed_token_carries_its_examples_weight(tokenizer, tmp_path, monkeypatch):
    """The example of each packed sequence is found independently, by matching its tokens with the unpacked rows;
    the weight each of its tokens gets in the loss is that example's weight."""
    train, holdout = data()
    unpacked = ICASFTTrainer(
        model_for(tokenizer),
        args=ICASFTConfig(str(tmp_path / "u"), **COMMON),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )
    ids_of = {tuple(row["input_ids"]): row["ica_index"] for row in unpacked.train_dataset}
    packed = ICASFTTrainer(
        model_for(tokenizer),
        args=ICASFTConfig(str(tmp_path / "p"), packing=True, **COMMON),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )
    weight_of = lambda i: 0.1 + 0.07 * i  # noqa: E731 - a distinct weight per example
    force_weights(packed, lambda indices, scores: [weight_of(i) for i in indices], monkeypatch)
    rows = [packed.train_dataset[0], packed.train_dataset[1]]
    truth = []  # the example of every token of the flattened batch, by matching tokens
    for row in rows:
        start = 0
        for length in row["seq_lengths"]:
            truth += [ids_of[tuple(row["input_ids"][start : start + length])]] * length
            start += length
    seen = {}
    handle = packed.model.register_forward_hook(
        lambda m, a, k, out: (
            seen.update(plain=out.log_probs.detach().clone(), out=out) if k.get("fused_lm_head") else None
        ),
        with_kwargs=True,
    )
    packed.compute_loss(packed.model.train(), dict(packed.data_collator(rows)))
    handle.remove()
    plain, weighted = seen["plain"][0], seen["out"].log_probs.detach()[0]
    trained = plain != 0
    expected = torch.tensor([weight_of(i) for i in truth[1:]], dtype=plain.dtype)  # log_probs predict tokens 1..T
    assert trained.sum() > 10
    # one float32 multiplication by the weight: the ratio is the weight to about 1 ulp (1.2e-7 relative)
    torch.testing.assert_close(weighted[trained] / plain[trained], expected[trained], rtol=1e-5, atol=0)


@pytest.mark.parametrize("strategy", ["bfd_split", "wrapped"])
def test_packing_that_splits_sequences_is_refused(tmp_path, strategy):
    with pytest.raises(ValueError, match=rf"`packing_strategy`='{strategy}' splits sequences across packed rows"):
        ICASFTConfig(str(tmp_path), packing=True, packing_strategy=strategy, **COMMON)
