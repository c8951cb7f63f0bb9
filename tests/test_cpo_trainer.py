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
    conv_pair,
    dpo_pairs,
    four_bit_tiny_llama,
    tiny_llama_for,
    tiny_lora,
    weighted_loss_and_grads,
)

from trl_ica import ICACPOConfig, ICACPOTrainer, ICASimPOConfig, score_ica
from trl_ica.scoring.options import ICAScoringOptions

COMMON = dict(CPU_ARGS, max_length=256)
MODES = {"simpo": (ICASimPOConfig, {}), "cpo": (ICACPOConfig, dict(loss_type="sigmoid", cpo_alpha=1.0))}


def cpo_trainer(tokenizer, tmp_path, mode="simpo", model=None, train=None, holdout=None, peft_config=None, **kwargs):
    config, fields = MODES[mode]
    default_train, default_holdout = dpo_pairs()
    args = config(
        output_dir=str(tmp_path),
        **{
            **COMMON,
            **SUMMED_DIFFERENCE,
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-2,
            **fields,
            **kwargs,
        },
    )
    return ICACPOTrainer(
        model or tiny_llama_for(tokenizer),
        args=args,
        train_dataset=train or default_train,
        processing_class=tokenizer,
        holdout_dataset=holdout or default_holdout,
        peft_config=peft_config,
    )


def test_simpo_config_has_the_papers_defaults(tmp_path):
    args = ICASimPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (args.loss_type, args.cpo_alpha, args.beta, args.learning_rate) == ("simpo", 0.0, 2.5, 1e-6)
    assert args.simpo_gamma / args.beta == pytest.approx(0.55)
    assert ICASimPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=2.0).beta == 2.0


@pytest.mark.parametrize("mode", list(MODES))
def test_unit_weights_reproduce_cpotrainer(tokenizer, tmp_path, mode):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config, fields = MODES[mode]
    settings = dict(COMMON, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    settings.update(
        learning_rate=5e-2,
        **{k: getattr(config("x", use_cpu=True, bf16=False), k) for k in ("loss_type", "cpo_alpha", "beta")},
    )
    train, holdout = dpo_pairs()
    stock = CPOTrainer(
        tiny_llama_for(tokenizer),
        args=CPOConfig(
            output_dir=str(tmp_path / "a"), simpo_gamma=config("x", use_cpu=True, bf16=False).simpo_gamma, **settings
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=tiny_lora(),
    )
    stock.train()
    ours = cpo_trainer(
        tokenizer,
        tmp_path / "b",
        mode,
        peft_config=tiny_lora(),
        ica_weighting="none",
        ica_refresh="online",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    initial = {n: p.clone() for n, p in ours.model.named_parameters() if p.requires_grad}
    ours.train()
    keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "nll_loss")
    logged = [h for h in ours.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["ica/weight_mean"] == 1.0 for h in logged)
    # The weighted NLL term is recomputed (per-token cross-entropy, summed, divided by the tokens) where TRL takes a
    # mean: float32 rounding of the same sum in another order, a few ulp of each logged value and parameter.
    for a, b in zip([h for h in stock.state.log_history if "loss" in h], logged):
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-5, abs=1e-6)
    for (name, p), (_, q) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(initial[n], p) for n, p in ours.model.named_parameters() if p.requires_grad)


def naive_pair_logps(model, batch, mean):
    """Chosen and rejected log-probs of the batch from full logits, summed or (SimPO) per token, and the chosen NLL."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    token = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    logps = token.sum(1) / (mask.sum(1) if mean else 1)
    return logps.chunk(2), -token.chunk(2)[0], mask.chunk(2)[0]


@pytest.mark.parametrize("mode", list(MODES))
def test_weights_scale_each_pairs_loss_and_the_nll_term(tokenizer, tmp_path, monkeypatch, mode):
    # Equal-length pairs, so the stock collator pads chosen and rejected alike and the naive batch needs no re-padding
    from datasets import Dataset

    train = Dataset.from_list([conv_pair(f"What is {i}?", f"It is {i}.", f"It is {i + 1}.") for i in range(3, 9)])
    trainer = cpo_trainer(tokenizer, tmp_path, mode, train=train)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    weights = np.array([0.0, 1.0, 0.4])
    loss, ours = weighted_loss_and_grads(trainer, batch, weights, monkeypatch)
    model = trainer.model

    args = trainer.args
    (chosen, rejected), chosen_nll, chosen_mask = naive_pair_logps(model, batch, mean=mode == "simpo")
    margin = chosen - rejected - (args.simpo_gamma / args.beta if mode == "simpo" else 0.0)
    w = torch.tensor(weights, dtype=margin.dtype)
    reference = (w * -F.logsigmoid(args.beta * margin)).mean()
    reference = reference + args.cpo_alpha * (chosen_nll * w[:, None]).sum() / chosen_mask.sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=LOSS_ATOL)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, **GRAD_TOL)


def test_weight_zero_removes_a_pairs_gradient(tokenizer, tmp_path, monkeypatch):
    trainer = cpo_trainer(tokenizer, tmp_path, "simpo", peft_config=tiny_lora())
    assert_weight_zero_drops_a_pair(trainer, monkeypatch)


@pytest.mark.parametrize("mode", list(MODES))
def test_online_scores_match_the_engine(tokenizer, tmp_path, mode):
    model = tiny_llama_for(tokenizer)
    train, holdout = dpo_pairs()
    options = ICAScoringOptions(form="difference", reduction="sum")
    expected = score_ica(model, tokenizer, train, holdout, options, show_progress=False).scores
    trainer = cpo_trainer(tokenizer, tmp_path, mode, model=model, ica_refresh="online", learning_rate=0.0)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(rows) == 12
    np.testing.assert_allclose([r["score"] for r in rows], expected[[r["ica_index"] for r in rows]], atol=LOGP_ATOL)


def test_online_scores_of_standard_pairs_equal_the_engines(tmp_path):
    from datasets import Dataset
    from testing_utils import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = None  # CPOTrainer puts a BOS token before the prompt when the tokenizer has one

    rows = [
        {"prompt": f"What is {i} plus {i + 1}?", "chosen": f" It is {2 * i + 1}.", "rejected": f" It is {i}."}
        for i in range(8)
    ]
    model = tiny_llama_for(tokenizer)
    train, holdout = Dataset.from_list(rows), Dataset.from_list(rows[:3])
    expected = score_ica(
        model, tokenizer, train, holdout, ICAScoringOptions(form="difference", reduction="sum"), show_progress=False
    ).scores
    trainer = cpo_trainer(
        tokenizer, tmp_path, model=model, train=train, holdout=holdout, ica_refresh="online", learning_rate=0.0
    )
    assert_requests_are_the_training_sequences(trainer)
    trainer.train()
    got = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    np.testing.assert_allclose([r["score"] for r in got], expected[[r["ica_index"] for r in got]], atol=LOGP_ATOL)


def test_refresh_logs_ica_metrics_next_to_trls_and_resumes(tokenizer, tmp_path):
    settings = dict(max_steps=4, ica_refresh=2, save_strategy="steps", save_steps=2, peft_config=tiny_lora())
    full = cpo_trainer(tokenizer, tmp_path / "full", **settings)
    full.train()
    logged = [h for h in full.state.log_history if "loss" in h]
    assert all({"ica/weight_mean", "ica/score_std", "rewards/accuracies"} <= h.keys() for h in logged)
    assert full.ica.state.refreshes_done == 2
    cpo_trainer(tokenizer, tmp_path / "cut", **settings).train()
    os.remove(tmp_path / "cut" / "ica" / "weights.jsonl")
    cpo_trainer(tokenizer, tmp_path / "cut", **settings).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")
    )
    tail = [r for r in map(json.loads, open(tmp_path / "full" / "ica" / "weights.jsonl")) if r["step"] >= 2]
    again = [json.loads(line) for line in open(tmp_path / "cut" / "ica" / "weights.jsonl")]
    assert [r["ica_index"] for r in again] == [r["ica_index"] for r in tail]
    np.testing.assert_allclose([r["weight"] for r in again], [r["weight"] for r in tail], atol=WEIGHT_ATOL)


def test_qlora_four_bit_simpo_trains_on_cpu(tokenizer, tmp_path):
    model = four_bit_tiny_llama(tokenizer, tmp_path / "base")
    trainer = cpo_trainer(tokenizer, tmp_path / "out", model=model, peft_config=tiny_lora(), max_steps=2)
    trainer.train()
    assert any("4bit" in type(m).__name__ for m in trainer.model.modules())
    assert all(p.abs().max() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert np.isfinite(trainer.ica.state.scores).all()


def test_a_stock_config_as_args_trains_with_the_ica_defaults(tokenizer, tmp_path):
    from trl.experimental.cpo import CPOConfig

    train, holdout = dpo_pairs()
    trainer = ICACPOTrainer(
        tiny_llama_for(tokenizer),
        args=CPOConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, bf16=False, beta=0.3),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )
    assert type(trainer.args) is ICACPOConfig and trainer.args.beta == 0.3
    assert (trainer.args.ica_score_form, trainer.args.ica_weighting) == ("conditioned", "batch_minmax")
    trainer.train()
    assert np.isfinite(trainer.ica.state.scores).all()


def test_a_step_the_weights_do_not_reach_stops_instead_of_training_unweighted(tokenizer, tmp_path, monkeypatch):
    from trl.experimental.cpo import CPOTrainer

    def without_cpo_loss(self, model, batch, train_eval="train"):  # a loss that no longer goes through `cpo_loss`
        chosen_logps = self.concatenated_forward(model, batch)[0]
        return -chosen_logps.mean(), {}

    monkeypatch.setattr(CPOTrainer, "get_batch_loss_metrics", without_cpo_loss)
    seam = r"relies on `CPOTrainer.compute_loss` going through.*\(trl 1\.\d+.*did not reach the loss"
    with pytest.raises(RuntimeError, match=seam):
        cpo_trainer(tokenizer, tmp_path, max_steps=1).train()


def test_weighted_losses_computed_but_not_used_stop_the_step(tokenizer, tmp_path, monkeypatch):
    """`cpo_loss` runs and weights the pairs, but the loss TRL returns is computed from something else: the step
    stops, since it is the loss that must be weighted, not only the hook that must run."""
    from trl.experimental.cpo import CPOTrainer

    def weighted_then_dropped(self, model, batch, train_eval="train"):
        chosen_logps, rejected_logps = self.concatenated_forward(model, batch)[:2]
        self.cpo_loss(chosen_logps, rejected_logps)  # weighted here, then not used
        return -(chosen_logps - rejected_logps).mean(), {}

    monkeypatch.setattr(CPOTrainer, "get_batch_loss_metrics", weighted_then_dropped)
    with pytest.raises(RuntimeError, match=r"`CPOTrainer.compute_loss` going through.*did not reach the loss"):
        cpo_trainer(tokenizer, tmp_path, max_steps=1).train()
