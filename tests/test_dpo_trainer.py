import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testing_utils import (
    CPU_ARGS,
    GRAD_TOL,
    LOGP_ATOL,
    LOSS_ATOL,
    SUMMED_DIFFERENCE,
    WEIGHT_ATOL,
    assert_requests_are_the_training_sequences,
    assert_weight_zero_drops_a_pair,
    dpo_pairs,
    force_weights,
    four_bit_tiny_llama,
    tiny_llama_for,
    tiny_lora,
    weighted_loss_and_grads,
)
from trl import DPOConfig, DPOTrainer

from trl_ica import ICADPOConfig, ICADPOTrainer, score_ica
from trl_ica.scoring.options import ICAScoringOptions

COMMON = dict(CPU_ARGS, dataloader_drop_last=False)


def dpo_trainer(tokenizer, tmp_path, model=None, ref_model=None, peft_config=None, **kwargs):
    train, holdout = dpo_pairs()
    args = ICADPOConfig(
        output_dir=str(tmp_path),
        **{**COMMON, **SUMMED_DIFFERENCE, "max_steps": 3, "per_device_train_batch_size": 4, **kwargs},
    )
    return ICADPOTrainer(
        model or tiny_llama_for(tokenizer),
        ref_model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
        peft_config=peft_config,
    )


REFERENCE_SETUPS = {
    "peft": dict(peft=True),
    "precomputed": dict(settings=dict(precompute_ref_log_probs=True)),
    "ref_model": dict(ref=True),
}


@pytest.mark.parametrize("setup", list(REFERENCE_SETUPS))
def test_unit_weights_reproduce_dpotrainer(tokenizer, tmp_path, setup):
    spec = REFERENCE_SETUPS[setup]
    settings = dict(
        COMMON,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-2,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.5],
        **spec.get("settings", {}),
    )
    train, holdout = dpo_pairs()
    trainers = []
    for cls, config, extra in (
        (DPOTrainer, DPOConfig, {}),
        (ICADPOTrainer, ICADPOConfig, dict(holdout_dataset=holdout)),
    ):
        fields = {} if cls is DPOTrainer else dict(ica_weighting="none", ica_refresh="online")
        trainer = cls(
            tiny_llama_for(tokenizer),
            tiny_llama_for(tokenizer, seed=1) if spec.get("ref") else None,
            args=config(output_dir=str(tmp_path / cls.__name__), **settings, **fields),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=tiny_lora() if spec.get("peft") else None,
            **extra,
        )
        initial = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        trainers.append(trainer)
    stock, ours = trainers
    keys = ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
    for a, b in zip(
        [h for h in stock.state.log_history if "loss" in h], [h for h in ours.state.log_history if "loss" in h]
    ):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert b["ica/weight_mean"] == 1.0
    for (name, p), (_, q) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(initial[n], p) for n, p in ours.model.named_parameters() if p.requires_grad)


def naive_sequence_logps(model, batch):
    """Summed log-probs of each row's completion tokens from full logits: (2B,), chosen rows then rejected rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    token = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * mask
    return token, mask


def test_weights_scale_each_pairs_loss_for_every_loss_type(tokenizer, tmp_path, monkeypatch):
    ref = tiny_llama_for(tokenizer, seed=1).eval()
    beta = 0.3
    trainer = dpo_trainer(
        tokenizer,
        tmp_path,
        ref_model=ref,
        beta=beta,
        loss_type=["sigmoid", "hinge", "sft"],
        loss_weights=[1.0, 0.5, 0.25],
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    weights = np.array([0.0, 1.0, 0.4])
    loss, ours = weighted_loss_and_grads(trainer, batch, weights, monkeypatch)
    model = trainer.model

    token, mask = naive_sequence_logps(model, batch)
    with torch.no_grad():
        ref_token, _ = naive_sequence_logps(ref, batch)
    chosen, rejected = token.sum(1).chunk(2)
    ref_chosen, ref_rejected = ref_token.sum(1).chunk(2)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    w = torch.tensor(weights, dtype=delta.dtype)
    sigmoid = -F.logsigmoid(beta * delta)
    hinge = torch.relu(1 - beta * delta)
    chosen_mask = mask.chunk(2)[0]
    sft = -(token.chunk(2)[0] * w[:, None])[chosen_mask].mean()
    reference = (w * sigmoid).mean() + 0.5 * (w * hinge).mean() + 0.25 * sft
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=LOSS_ATOL)
    assert (w * sigmoid).mean().item() != pytest.approx(sigmoid.mean().item(), abs=1e-3)  # weights matter here
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, **GRAD_TOL)


def test_weight_zero_removes_a_pairs_gradient(tokenizer, tmp_path, monkeypatch):
    trainer = dpo_trainer(tokenizer, tmp_path, peft_config=tiny_lora())
    assert_weight_zero_drops_a_pair(trainer, monkeypatch)


def test_online_scores_equal_the_engines(tokenizer, tmp_path):
    model = tiny_llama_for(tokenizer)
    train, holdout = dpo_pairs()
    options = ICAScoringOptions(form="difference", reduction="sum")
    expected = score_ica(model, tokenizer, train, holdout, options, show_progress=False).scores
    trainer = dpo_trainer(
        tokenizer, tmp_path, model=model, peft_config=tiny_lora(), ica_refresh="online", learning_rate=0.0
    )
    assert_requests_are_the_training_sequences(trainer)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(rows) == 12
    np.testing.assert_allclose([r["score"] for r in rows], expected[[r["ica_index"] for r in rows]], atol=LOGP_ATOL)


def test_online_conditioned_form_scores_the_margin_with_demonstrations_only(tokenizer, tmp_path):
    model = tiny_llama_for(tokenizer)
    train, holdout = dpo_pairs()
    expected = score_ica(
        model, tokenizer, train, holdout, ICAScoringOptions(form="conditioned", reduction="sum"), show_progress=False
    ).scores
    trainer = dpo_trainer(
        tokenizer,
        tmp_path,
        model=model,
        peft_config=tiny_lora(),
        ica_refresh="online",
        learning_rate=0.0,
        ica_score_form="conditioned",
    )
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(rows) == 12
    np.testing.assert_allclose([r["score"] for r in rows], expected[[r["ica_index"] for r in rows]], atol=LOGP_ATOL)


def test_refresh_writes_pair_scores_and_logs_trl_and_ica_metrics(tokenizer, tmp_path):
    model = tiny_llama_for(tokenizer)
    train, holdout = dpo_pairs()
    expected = score_ica(
        model, tokenizer, train, holdout, ICAScoringOptions(form="difference", reduction="sum"), show_progress=False
    )
    trainer = dpo_trainer(tokenizer, tmp_path, model=model, precompute_ref_log_probs=True, max_steps=4, ica_refresh=2)
    trainer.train()
    first = [json.loads(line) for line in open(tmp_path / "ica" / "refresh-0.jsonl")]
    np.testing.assert_allclose([r["score"] for r in first], expected.scores, atol=LOGP_ATOL)
    np.testing.assert_allclose([r["logp_chosen"] for r in first], expected.pair_logps[:, 2], atol=LOGP_ATOL)
    assert os.path.isfile(tmp_path / "ica" / "refresh-1.jsonl")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"ica/weight_mean", "rewards/accuracies", "logps/chosen"} <= h.keys() for h in logged)
    assert any(h["ica/weight_min"] < h["ica/weight_max"] for h in logged)


def test_resume_continues_with_the_same_weights(tokenizer, tmp_path):
    settings = dict(
        max_steps=4, ica_refresh=2, learning_rate=5e-2, save_strategy="steps", save_steps=2, peft_config=tiny_lora()
    )
    dpo_trainer(tokenizer, tmp_path / "full", **settings).train()
    dpo_trainer(tokenizer, tmp_path / "cut", **settings).train()
    os.remove(tmp_path / "cut" / "ica" / "weights.jsonl")
    resumed = dpo_trainer(tokenizer, tmp_path / "cut", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    full = [json.loads(line) for line in open(tmp_path / "full" / "ica" / "weights.jsonl")]
    again = [json.loads(line) for line in open(tmp_path / "cut" / "ica" / "weights.jsonl")]
    tail = [r for r in full if r["step"] >= 2]
    assert [r["ica_index"] for r in again] == [r["ica_index"] for r in tail]
    np.testing.assert_allclose([r["weight"] for r in again], [r["weight"] for r in tail], atol=WEIGHT_ATOL)


def test_qlora_four_bit_trains_on_cpu(tokenizer, tmp_path):
    model = four_bit_tiny_llama(tokenizer, tmp_path / "base")
    trainer = dpo_trainer(
        tokenizer, tmp_path / "out", model=model, peft_config=tiny_lora(), max_steps=2, learning_rate=5e-2
    )
    trainer.train()
    assert any("4bit" in type(m).__name__ for m in trainer.model.modules())
    assert all(p.abs().max() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert np.isfinite(trainer.ica.state.scores).all()


def test_sorting_losses_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`loss_type` \['aot'\] cannot be ICA-weighted"):
        ICADPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type=["sigmoid", "aot"])


def test_wpo_weighting_composes_with_ica_weights(tokenizer, tmp_path, monkeypatch):
    losses = {}
    for name, weights in (("unit", [1.0, 1.0, 1.0]), ("half", [0.5, 0.5, 0.5])):
        trainer = dpo_trainer(tokenizer, tmp_path / name, peft_config=tiny_lora(), use_weighting=True)
        force_weights(trainer, weights, monkeypatch)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        losses[name] = trainer.compute_loss(trainer.model.train(), dict(batch)).item()
    stock = DPOTrainer(
        tiny_llama_for(tokenizer),
        args=DPOConfig(output_dir=str(tmp_path / "stock"), **COMMON, use_weighting=True),
        train_dataset=dpo_pairs()[0],
        processing_class=tokenizer,
        peft_config=tiny_lora(),
    )
    batch = stock.data_collator([stock.train_dataset[i] for i in range(3)])
    assert losses["unit"] == stock.compute_loss(stock.model.train(), dict(batch)).item()
    # the weight 0.5 reaches the loss as exp(mean_t(log 0.5)) in float32: a few ulp off 0.5
    assert losses["half"] == pytest.approx(losses["unit"] / 2, rel=1e-5)


def test_a_step_the_weights_do_not_reach_stops_instead_of_training_unweighted(tokenizer, tmp_path, monkeypatch):
    def plain_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(input_ids=inputs["input_ids"]).logits.float().mean()

    monkeypatch.setattr(DPOTrainer, "compute_loss", plain_loss)
    seam = r"relies on `DPOTrainer.compute_loss` calling the policy.*\(trl 1\.\d+.*did not reach the loss"
    with pytest.raises(RuntimeError, match=seam):
        dpo_trainer(tokenizer, tmp_path, peft_config=tiny_lora(), max_steps=1).train()


@pytest.mark.parametrize("moved", ["factor_not_applied", "other_factor"])
def test_a_step_whose_pair_factor_trl_stopped_applying_stops(tokenizer, tmp_path, monkeypatch, moved):
    """The policy forward still sets the factor, but TRL no longer multiplies the pair losses by it (or multiplies by
    another value than the weights): the hook fired, yet the step would train unweighted, so it stops."""
    from trl_ica import seams

    original = seams._OutOfPlaceProduct.__torch_function__.__func__

    def moved_seam(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.mul_, torch.Tensor.__imul__) and type(args[0]) is torch.Tensor:
            if moved == "factor_not_applied":
                return args[0]  # TRL dropped the product
            args = (args[0], args[1].as_subclass(torch.Tensor).sqrt().as_subclass(cls))  # another factor
        return original(cls, func, types, args, kwargs)

    monkeypatch.setattr(seams._OutOfPlaceProduct, "__torch_function__", classmethod(moved_seam))
    seam = r"relies on `DPOTrainer.compute_loss` calling the policy.*did not reach the loss"
    trainer = dpo_trainer(tokenizer, tmp_path, peft_config=tiny_lora(), max_steps=1, ica_weighting="batch_minmax")
    with pytest.raises(RuntimeError, match=seam):
        trainer.train()
