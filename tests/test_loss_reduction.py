"""`ica_loss_reduction`: how a step's weighted losses are divided.

`"token_mean"` is `sum_i w_i nll_i / sum_i n_i` (the trainers' own divisor), `"weighted_mean"` is
`sum_i w_i nll_i / sum_i w_i n_i`, over every micro-batch of the optimizer step. One SGD step over 16 rows, with
weights forced to distinct values, is compared with a naive step computed from per-row forwards.
"""

import numpy as np
import pytest
import torch
from testing_utils import GRAD_TOL, STEP_ROWS, force_weights, step_trainer, tiny_llama

WEIGHTS = lambda indices, scores: [0.1 + 0.05 * i for i in indices]  # noqa: E731 - distinct, from the index


def _naive_sft_step(trainer, tokenizer, reduction: str) -> dict[str, torch.Tensor]:
    """The parameters after one SGD step (lr 0.5) on the naive loss over the trainer's 16 rows, each row run alone."""
    model = tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    numerator, denominator = 0.0, 0.0
    for row in trainer.train_dataset:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        target = labels[0, 1:]
        scored = target != -100
        nll = -logp[scored].gather(-1, target[scored][:, None]).sum()
        w = WEIGHTS([row["ica_index"]], None)[0]
        numerator = numerator + w * nll
        denominator += (w if reduction == "weighted_mean" else 1.0) * int(scored.sum())
    (numerator / denominator).backward()
    with torch.no_grad():
        return {n: (p - 0.5 * p.grad).detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["token_mean", "weighted_mean"])
@pytest.mark.parametrize("split", [(16, 1), (4, 4)])
def test_sft_step_equals_the_naive_weighted_loss(tokenizer, tmp_path, reduction, split):
    trainer = step_trainer("sft", tokenizer, tmp_path, *split, ica_loss_reduction=reduction)
    force_weights(trainer, WEIGHTS, pytest.MonkeyPatch())
    trainer.train()
    expected = _naive_sft_step(trainer, tokenizer, reduction)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], **GRAD_TOL, msg=f"{reduction} {split} {name}")


@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_unit_weights_give_the_same_step_under_both_reductions(tokenizer, tmp_path, kind):
    """With every weight 1 the scale is exactly 1, so the parameters are bit for bit those of `token_mean`, which the
    trainers' own tests hold to the stock trainer."""
    params = []
    for reduction in ("token_mean", "weighted_mean"):
        trainer = step_trainer(kind, tokenizer, tmp_path / reduction, 4, 4, ica_loss_reduction=reduction)
        force_weights(trainer, lambda indices, scores: np.ones(len(indices)), pytest.MonkeyPatch())
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_pairs_under_weighted_mean_divide_by_the_sum_of_weights(tokenizer, tmp_path, kind):
    """A pair counts 1: one step of 16 pairs under `weighted_mean` moves every parameter by 16 / sum(w) times its
    move under `token_mean` (plain SGD is linear in the loss)."""
    moves = []
    for reduction in ("token_mean", "weighted_mean"):
        trainer = step_trainer(kind, tokenizer, tmp_path / reduction, 16, 1, ica_loss_reduction=reduction)
        force_weights(trainer, WEIGHTS, pytest.MonkeyPatch())
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        moves.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    scale = STEP_ROWS / sum(WEIGHTS(range(STEP_ROWS), None))
    assert abs(scale - 1) > 0.1  # the two reductions differ here
    assert max(m.abs().max().item() for m in moves[0].values()) > 1e-4
    for name, move in moves[0].items():
        torch.testing.assert_close(moves[1][name], move * scale, **GRAD_TOL, msg=name)


def test_weighted_mean_refuses_steps_of_one_example_and_unknown_values(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="would train unweighted"):
        step_trainer(
            "sft", tokenizer, tmp_path, 1, 1, ica_loss_reduction="weighted_mean", ica_weighting="global_minmax"
        )
    with pytest.raises(ValueError, match=r"`ica_loss_reduction` must be one of \['token_mean', 'weighted_mean'\]"):
        step_trainer("sft", tokenizer, tmp_path, 4, 4, ica_loss_reduction="mean")
