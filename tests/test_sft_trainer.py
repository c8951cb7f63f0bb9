import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import (
    CPU_ARGS,
    GRAD_TOL,
    LOGP_ATOL,
    LOSS_ATOL,
    SUMMED_DIFFERENCE,
    WEIGHT_ATOL,
    chat_row,
    force_weights,
    four_bit_tiny_llama,
    score_files,
    stock_and_ica_sft,
    tiny_llama,
    weighted_loss_and_grads,
)
from trl import SFTTrainer

from trl_ica import ICASFTConfig, ICASFTTrainer, score_ica
from trl_ica.scoring.options import ICAScoringOptions

COMMON = dict(CPU_ARGS, dataloader_drop_last=False)


def data(n=12):
    train = Dataset.from_list(
        [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 3)) for i in range(n)]
    )
    holdout = Dataset.from_list([chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(5)])
    return train, holdout


def model_for(tokenizer, seed=0):
    return tiny_llama(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def ica_trainer(tokenizer, tmp_path, model=None, train=None, holdout=None, **kwargs):
    default_train, default_holdout = data()
    args = ICASFTConfig(
        output_dir=str(tmp_path),
        **{**COMMON, **SUMMED_DIFFERENCE, "max_steps": 3, "per_device_train_batch_size": 4, **kwargs},
    )
    return ICASFTTrainer(
        model or model_for(tokenizer),
        args=args,
        train_dataset=train or default_train,
        processing_class=tokenizer,
        holdout_dataset=holdout or default_holdout,
    )


@pytest.mark.parametrize("form", ["difference", "conditioned"])
def test_online_scoring_leaves_a_lora_run_unchanged(tokenizer, tmp_path, form):
    """With unit weights an online run trains exactly like the stock one: scoring with the adapted model between
    steps changes neither the adapter nor the training forward."""
    from peft import LoraConfig

    train, holdout = data()
    settings = dict(COMMON, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    unit = dict(ica_refresh="online", ica_weighting="none", ica_score_form=form)
    stock, ours = stock_and_ica_sft(
        tokenizer, tmp_path, train, holdout, settings, unit, peft_config=LoraConfig(**lora)
    )
    assert ours.ica.state.scores is not None and np.isfinite(ours.ica.state.scores).any()
    trained = [(n, p) for n, p in stock.model.named_parameters() if p.requires_grad]
    assert trained and all("lora" in n for n, _ in trained)
    assert any(p.abs().sum() > 0 for n, p in trained if "lora_B" in n)  # B starts at 0: the adapter trained
    mine = dict(ours.model.named_parameters())
    for name, p in trained:
        assert torch.equal(p, mine[name]), name


def train_stock_and_ica(tokenizer, tmp_path, settings, **ica_fields):
    """The same run with SFTTrainer and with ICASFTTrainer (extra `ica_fields`); both trainers, trained."""
    train, holdout = data()
    stock, ours = stock_and_ica_sft(tokenizer, tmp_path, train, holdout, settings, ica_fields)
    for (name, p), (_, q) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        assert torch.equal(p, q), name
    return stock, ours


def test_unit_weights_reproduce_sfttrainer_with_gradient_accumulation(tokenizer, tmp_path):
    settings = dict(
        COMMON, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2
    )
    stock, ours = train_stock_and_ica(tokenizer, tmp_path, settings, ica_weighting="none")
    stock_losses = [h["loss"] for h in stock.state.log_history if "loss" in h]
    assert stock_losses == [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert stock.model.model.embed_tokens.weight.ne(model_for(tokenizer).model.embed_tokens.weight).any()


def test_weights_scale_each_examples_loss_and_zero_removes_its_gradient(tokenizer, tmp_path, monkeypatch):
    trainer = ica_trainer(tokenizer, tmp_path, per_device_train_batch_size=3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    weights = np.array([0.0, 1.0, 0.25])
    loss, ours = weighted_loss_and_grads(trainer, batch, weights, monkeypatch)
    model = trainer.model

    # Reference: per-example summed NLL from full logits, weighted, over all the batch's loss tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    reference = -(torch.tensor(weights, dtype=token_lp.dtype) * token_lp.sum(1)).sum() / mask.sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=LOSS_ATOL)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, **GRAD_TOL)

    # Weight 0: the first example contributes no gradient at all
    model.zero_grad()
    only_rest = -(torch.tensor([0.0, 1.0, 0.25]) * token_lp.detach().sum(1)).sum()
    assert only_rest.item() != 0
    logits0 = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]).logits
    force_weights(trainer, [0.0], monkeypatch)
    single = {k: v[:1] for k, v in batch.items()}
    trainer.compute_loss(model, single).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    assert logits0.requires_grad


def test_refresh_writes_scores_and_logs_metrics(tokenizer, tmp_path):
    trainer = ica_trainer(tokenizer, tmp_path, max_steps=4, ica_refresh=2, learning_rate=5e-2)
    trainer.train()
    assert trainer.ica.state.refreshes_done == 2
    first = [json.loads(line) for line in open(tmp_path / "ica" / "refresh-0.jsonl")]
    second = [json.loads(line) for line in open(tmp_path / "ica" / "refresh-1.jsonl")]
    assert [r["ica_index"] for r in first] == list(range(12)) and second[0]["step"] == 2
    assert any(abs(a["score"] - b["score"]) > 1e-6 for a, b in zip(first, second))  # the model moved in between
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"ica/score_mean", "ica/score_std", "ica/weight_mean", "ica/weight_min"} <= h.keys() for h in logged)
    assert os.path.isfile(tmp_path / "ica" / "weights.png") and os.path.isfile(tmp_path / "ica" / "scores-0.png")


def test_scores_before_training_equal_compute_ica_scores(tokenizer, tmp_path):
    model = model_for(tokenizer)
    train, holdout = data()
    paper = ICAScoringOptions(form="difference", reduction="sum")
    expected = score_ica(model, tokenizer, train, holdout, paper, show_progress=False).scores
    trainer = ica_trainer(tokenizer, tmp_path, model=model, max_steps=1)
    trainer.train()
    first = [json.loads(line)["score"] for line in open(tmp_path / "ica" / "refresh-0.jsonl")]
    np.testing.assert_allclose(first, expected, atol=LOGP_ATOL)


def test_online_scores_equal_the_engines(tokenizer, tmp_path):
    model = model_for(tokenizer)
    train, holdout = data()
    expected = score_ica(
        model, tokenizer, train, holdout, ICAScoringOptions(form="difference", reduction="sum"), show_progress=False
    ).scores
    trainer = ica_trainer(tokenizer, tmp_path, model=model, ica_refresh="online", learning_rate=0.0, max_steps=3)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(rows) == 12
    np.testing.assert_allclose([r["score"] for r in rows], expected[[r["ica_index"] for r in rows]], atol=LOGP_ATOL)


@pytest.mark.parametrize("noise", [dict(attention_dropout=0.5), dict(neftune_noise_alpha=5.0)])
def test_online_scores_carry_no_training_noise(tokenizer, tmp_path, noise):
    """Train-mode noise (attention dropout, applied inside attention in training mode only; NEFTune's noise on the
    input embeddings) never reaches the online scores: both passes run in the engine, in eval mode, so the scores
    are those of a noise-free scoring."""
    config = {k: v for k, v in noise.items() if k != "neftune_noise_alpha"}
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config).train()
    train, holdout = data()
    expected = score_ica(
        model, tokenizer, train, holdout, ICAScoringOptions(form="difference", reduction="sum"), show_progress=False
    ).scores
    fields = {k: v for k, v in noise.items() if k == "neftune_noise_alpha"}
    trainer = ica_trainer(
        tokenizer, tmp_path, model=model, ica_refresh="online", learning_rate=0.0, max_steps=3, **fields
    )
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    np.testing.assert_allclose([r["score"] for r in rows], expected[[r["ica_index"] for r in rows]], atol=LOGP_ATOL)


def test_conditioned_form_with_summed_log_probs_warns(tmp_path):
    with pytest.warns(UserWarning, match="ranks short responses first"):
        ICASFTConfig(
            output_dir=str(tmp_path), use_cpu=True, bf16=False, ica_score_form="conditioned", ica_reduction="sum"
        )


@pytest.mark.parametrize("refresh", [1, "online"])
def test_conditioned_form_weights_by_the_engines_conditioned_scores(tokenizer, tmp_path, refresh):
    model = model_for(tokenizer)
    train, holdout = data()
    options = ICAScoringOptions(form="conditioned", reduction="mean")
    expected = score_ica(model, tokenizer, train, holdout, options, show_progress=False).scores
    trainer = ica_trainer(
        tokenizer,
        tmp_path,
        model=model,
        ica_refresh=refresh,
        learning_rate=0.0,
        max_steps=3,
        ica_score_form="conditioned",
        ica_reduction="mean",
    )
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    scores = np.array([r["score"] for r in rows])
    np.testing.assert_allclose(scores, expected[[r["ica_index"] for r in rows]], atol=LOGP_ATOL)
    low, high = scores[:4].min(), scores[:4].max()  # batch min-max of the first batch
    # float64 min-max of the logged scores, as the trainer computes it
    np.testing.assert_allclose([r["weight"] for r in rows[:4]], (scores[:4] - low) / (high - low), atol=WEIGHT_ATOL)
    if refresh == 1:
        first = [json.loads(line) for line in open(tmp_path / "ica" / "refresh-0.jsonl")]
        assert all(r["logp_unconditioned"] is None for r in first)  # not computed: written as null, not NaN


def test_resume_restores_scores_and_continues_with_the_same_weights(tokenizer, tmp_path):
    settings = dict(max_steps=4, ica_refresh=2, learning_rate=5e-2, save_strategy="steps", save_steps=2)
    ica_trainer(tokenizer, tmp_path / "full", **settings).train()
    first = ica_trainer(tokenizer, tmp_path / "cut", **settings)
    first.train()
    assert os.path.isfile(tmp_path / "cut" / "checkpoint-2" / "ica_state.npz")
    resumed = ica_trainer(tokenizer, tmp_path / "cut", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    full = [json.loads(line) for line in open(tmp_path / "full" / "ica" / "weights.jsonl")]
    # the log keeps the steps the checkpoint covers and continues from there: one row per example and step
    again = [json.loads(line) for line in open(tmp_path / "cut" / "ica" / "weights.jsonl")]
    assert [(r["step"], r["ica_index"]) for r in again] == [(r["step"], r["ica_index"]) for r in full]
    np.testing.assert_allclose([r["weight"] for r in again], [r["weight"] for r in full], atol=WEIGHT_ATOL)
    assert resumed.ica.state.refreshes_done == 2


def test_resume_from_a_checkpoint_without_ica_state_is_an_error(tokenizer, tmp_path):
    os.makedirs(tmp_path / "checkpoint-1")
    trainer = ica_trainer(tokenizer, tmp_path)
    with pytest.raises(FileNotFoundError, match="has no ica_state.npz"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_lora_trains_only_the_adapter(tokenizer, tmp_path):
    from peft import LoraConfig

    model = model_for(tokenizer)
    base = {n: p.clone() for n, p in model.named_parameters()}
    train, holdout = data()
    settings = {**COMMON, **SUMMED_DIFFERENCE, "max_steps": 3, "learning_rate": 5e-2}
    args = ICASFTConfig(output_dir=str(tmp_path), **settings)
    trainer = ICASFTTrainer(
        model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            assert param.abs().max() > 0, name
        elif "lora" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base[key]), name


def test_qlora_four_bit_trains_on_cpu(tokenizer, tmp_path):
    from peft import LoraConfig

    model = four_bit_tiny_llama(tokenizer, tmp_path / "base")
    train, holdout = data()
    args = ICASFTConfig(
        output_dir=str(tmp_path / "out"),
        **{**COMMON, **SUMMED_DIFFERENCE, "max_steps": 2, "learning_rate": 5e-2, "per_device_train_batch_size": 4},
    )
    trainer = ICASFTTrainer(
        model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    assert any("4bit" in type(m).__name__ for m in trainer.model.modules())
    assert all(p.abs().max() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert np.isfinite(trainer.ica.state.scores).all()


def test_messages_dataset_trains_and_falls_back_when_prompt_tokens_carry_loss(tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": f"{i}."}]}
        for i in range(8)
    ]
    holdout = rows[:3]
    trainer = ica_trainer(
        tokenizer,
        tmp_path,
        train=Dataset.from_list(rows),
        holdout=Dataset.from_list(holdout),
        ica_refresh="online",
        max_steps=2,
    )
    trainer.train()
    trained = {r["ica_index"] for r in map(json.loads, open(tmp_path / "ica" / "weights.jsonl"))}
    assert np.isfinite(trainer.ica.state.scores[list(trained)]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"packing": True, "packing_strategy": "wrapped"}, "`packing_strategy`='wrapped' splits sequences"),
        ({"ica_weighting": "minmax"}, "`ica_weighting` must be one of"),
        ({"ica_refresh": "0"}, "`ica_refresh` must be a positive integer or 'online'"),
        ({"ica_demo_selection": "nearest"}, "`ica_demo_selection` must be one of"),
        ({"ica_score_form": "ratio"}, "`ica_score_form` must be one of"),
        ({"ica_demo_layout": "chat"}, r"`ica_demo_layout` must be one of \['in_turn', 'turns'\], got 'chat'"),
        ({"ica_score_end_token": "no"}, "`ica_score_end_token` must be True or False, got 'no'"),
        ({"ica_weighting": "holdout_quantile", "ica_holdout_cutoff": 0}, r"`ica_holdout_cutoff` must be .* \(0, 1\]"),
        (
            {"ica_holdout_cutoff": 0.1, "ica_weighting": "batch_minmax"},
            "applies to `ica_weighting='holdout_quantile'` only, but `ica_weighting` is",
        ),
        ({"loss_type": "dft"}, "supports `loss_type='nll'`"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"ica_demo_template": "{prompt}{response}"}, "Set both `ica_demo_template` and `ica_query_template`"),
        ({"ica_scoring_max_tokens": 0}, "`ica_scoring_max_tokens` must be a positive integer or None, got 0"),
        ({"ica_scoring_batch_size": -2}, "`ica_scoring_batch_size` must be a positive integer or None, got -2"),
    ],
)
def test_bad_config(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ICASFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **kwargs)


@pytest.mark.parametrize(
    ("train", "holdout", "kwargs", "message"),
    [
        ("ok", None, {}, "`holdout_dataset` is required"),
        ("ok", "empty", {}, "`holdout` is empty"),
        ("ok", "no_response", {}, "holdout row 0: the response is empty"),
        ("ok", "ok", {"ica_num_demos": 9}, r"`num_demos` must be an integer in \[1, 5\]"),
        ("ok", "ok", {"ica_max_length": 30}, r"longer than `ica_max_length`=30 .*`ica_num_demos` in a trainer"),
        ("indexed", "ok", {}, "already has a column named 'ica_index'"),
    ],
)
def test_bad_data(tokenizer, tmp_path, train, holdout, kwargs, message):
    good_train, good_holdout = data()
    trains = {
        "ok": good_train,
        "indexed": good_train.add_column("ica_index", list(range(12))),
    }
    holdouts = {
        "ok": good_holdout,
        None: None,
        "empty": Dataset.from_list([]),
        "no_response": Dataset.from_list(
            [{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": ""}]}]
        ),
    }
    args = ICASFTConfig(output_dir=str(tmp_path), **{**COMMON, **SUMMED_DIFFERENCE, **kwargs})
    with pytest.raises(ValueError, match=message):
        ICASFTTrainer(
            model_for(tokenizer),
            args=args,
            train_dataset=trains[train],
            processing_class=tokenizer,
            holdout_dataset=holdouts[holdout],
        )


def test_training_max_length_does_not_bound_the_scoring(tokenizer, tmp_path):
    """Rows fit the training `max_length` but not with their demonstrations: scoring is bounded by the model's
    context (or `ica_max_length`), so the trainer starts and scores every row in full."""
    trainer = ica_trainer(tokenizer, tmp_path, max_length=30)
    builder = trainer.ica.builder
    longest = max(builder.conditioned(i).num_tokens for i in range(len(builder.candidates)))
    assert longest > 30
    assert longest <= trainer.model.config.max_position_embeddings


@pytest.mark.parametrize("disable", [True, False])
def test_scoring_progress_bars_follow_disable_tqdm(tokenizer, tmp_path, capfd, disable):
    trainer = ica_trainer(tokenizer, tmp_path, disable_tqdm=disable, max_steps=1, ica_demo_selection="knn")
    trainer.train()
    err = capfd.readouterr().err
    assert ("ICA scoring" in err) is not disable and ("Embedding" in err) is not disable


def test_padding_free_unit_weights_reproduce_sfttrainer(tokenizer, tmp_path):
    settings = dict(
        COMMON, max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2, padding_free=True, max_length=None
    )
    train_stock_and_ica(tokenizer, tmp_path, settings, ica_weighting="none", ica_refresh="online")


def test_padding_free_weights_follow_each_packed_sequence(tokenizer, tmp_path, monkeypatch):
    padded = ica_trainer(tokenizer, tmp_path / "a", per_device_train_batch_size=3, ica_refresh="online")
    packed = ica_trainer(
        tokenizer,
        tmp_path / "b",
        per_device_train_batch_size=3,
        ica_refresh="online",
        padding_free=True,
        max_length=None,
    )
    weights = np.array([0.0, 1.0, 0.25])
    losses, scores = [], []
    for trainer in (padded, packed):

        def record(indices, s):
            scores.append(np.asarray(s))
            return weights

        force_weights(trainer, record, monkeypatch)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        trainer.model.train()
        losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
    assert "seq_idx" in packed.data_collator([packed.train_dataset[i] for i in range(3)])
    assert losses[0] == pytest.approx(losses[1], abs=LOSS_ATOL)
    # online log p(y | x) recovered per packed sequence
    np.testing.assert_allclose(scores[0], scores[1], atol=LOGP_ATOL)


def test_a_scores_file_from_trl_ica_score_feeds_a_run(tokenizer, tmp_path):
    """`trl-ica score` once, then training reads its scores (checked against the rows and settings) instead of
    scoring: they equal the scores the trainer computes itself with the same model."""
    from trl_ica.cli import main as cli

    train, holdout = data()
    files = score_files(tmp_path, tokenizer, train, holdout, model=model_for(tokenizer))
    scored = tmp_path / "scored.jsonl"
    cli(["score", "--method", "ica", *files, "--output", str(scored), "--form", "difference", "--reduction", "sum"])
    file_scores = [json.loads(line)["score"] for line in open(scored)]

    given = ica_trainer(tokenizer, tmp_path / "given", ica_scores_file=str(scored), max_steps=1)
    np.testing.assert_array_equal(given.ica.state.scores, file_scores)  # taken as they are, before training
    assert given.ica.state.refreshes_done == 1
    given.train()
    assert [json.loads(line)["score"] for line in open(tmp_path / "given" / "ica" / "refresh-0.jsonl")] == file_scores

    quantile = ica_trainer(
        tokenizer, tmp_path / "q", ica_scores_file=str(scored), max_steps=1, ica_weighting="holdout_quantile"
    )
    quantile.train()  # the holdout's own scores are still computed, at the first step
    assert quantile.ica.state.reference is not None and np.isfinite(quantile.ica.state.reference).all()

    own = ica_trainer(tokenizer, tmp_path / "own", max_steps=1)
    own.train()
    np.testing.assert_allclose(own.ica.state.scores, file_scores, rtol=0, atol=LOGP_ATOL)  # same model, same requests

    with pytest.raises(ValueError, match="other settings than this run's .*ica_score_form: file 'difference'"):
        ica_trainer(
            tokenizer, tmp_path / "a", ica_scores_file=str(scored), ica_score_form="conditioned", ica_reduction="mean"
        )
    with pytest.raises(ValueError, match="other settings than this run's .*ica_demo_layout: file 'turns', run 'in"):
        ica_trainer(tokenizer, tmp_path / "l", ica_scores_file=str(scored), ica_demo_layout="in_turn")
    # `"auto"` is recorded as decided for the rows, by the command and by the run alike
    spans = tmp_path / "spans.jsonl"
    summed = ["--form", "difference", "--reduction", "sum"]
    cli(["score", "--method", "ica", *files, "--output", str(spans), *summed, "--score-span", "auto"])
    assert json.load(open(tmp_path / "spans.meta.json"))["ica_score_span"] == "last_line"
    ica_trainer(tokenizer, tmp_path / "auto", ica_scores_file=str(spans), ica_score_span="auto")
    with pytest.raises(ValueError, match="ica_score_span: file 'last_line', run None"):
        ica_trainer(tokenizer, tmp_path / "w", ica_scores_file=str(spans))
    shifted = Dataset.from_list(list(train)[1:] + list(train)[:1])
    with pytest.raises(ValueError, match=r"row 0 is not training row 0 \(columns \['prompt', 'completion'\]"):
        ica_trainer(tokenizer, tmp_path / "b", train=shifted, ica_scores_file=str(scored))
    with pytest.raises(ValueError, match="need `ica_refresh=1`, got 'online'"):
        ica_trainer(tokenizer, tmp_path / "c", ica_scores_file=str(scored), ica_refresh="online")
    os.remove(tmp_path / "scored.meta.json")
    with pytest.raises(ValueError, match="has no settings file"):
        ica_trainer(tokenizer, tmp_path / "d", ica_scores_file=str(scored))


def test_a_step_the_weights_do_not_reach_stops_instead_of_training_unweighted(tokenizer, tmp_path, monkeypatch):
    """If TRL's loss stops calling the model with `fused_lm_head=True` (the seam the weights ride on), the step
    raises rather than training unweighted."""

    def plain_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", plain_loss)
    seam = r"relies on `SFTTrainer.compute_loss` calling the model.*\(trl 1\.\d+.*did not reach the loss"
    with pytest.raises(RuntimeError, match=seam):
        ica_trainer(tokenizer, tmp_path, max_steps=1).train()


def test_a_loss_computed_inside_the_forward_stops_the_step(tokenizer, tmp_path, monkeypatch):
    """TRL's DeepSpeed sequence-parallel path: the fused head runs (the weighting hook fires and scales its
    `log_probs`) but the loss is the one the model computed inside its forward. The step stops: what is checked is
    that the loss was computed from the weighted log-probabilities, not only that the hook ran."""

    def loss_inside_forward(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model(**inputs, fused_lm_head=True)  # the hook fires here
        return model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", loss_inside_forward)
    with pytest.raises(RuntimeError, match=r"reducing its `log_probs` into the loss.*did not reach the loss"):
        ica_trainer(tokenizer, tmp_path, max_steps=1).train()


def test_fsdp1_is_refused_by_name(tokenizer, tmp_path, monkeypatch):
    """Under FSDP1 the root's flattened parameters are gathered by the root's forward only, which scoring skips."""
    from types import SimpleNamespace

    setup = ICASFTTrainer._ica_setup

    def as_fsdp(self, *args, **kwargs):
        self.is_fsdp_enabled = True
        monkeypatch.setattr(self.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=1), raising=False)
        return setup(self, *args, **kwargs)

    monkeypatch.setattr(ICASFTTrainer, "_ica_setup", as_fsdp)
    with pytest.raises(ValueError, match=r"FSDP2 only, but this run uses FSDP version 1 \(TRL's `fsdp1`"):
        ica_trainer(tokenizer, tmp_path)


def test_deepspeed_sequence_parallelism_is_refused(tokenizer, tmp_path, monkeypatch):
    import trl_ica.seams as seams

    monkeypatch.setattr(seams, "sequence_sharding", lambda accelerator: {"sp": "sp_size=2, sp_backend='deepspeed'"})
    with pytest.raises(ValueError, match=r"DeepSpeed sequence parallelism \(sp_size=2.*Train without sequence"):
        ica_trainer(tokenizer, tmp_path)


def test_scores_and_weights_reach_tensorboard_as_histograms(tokenizer, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = ica_trainer(tokenizer, tmp_path, max_steps=4, ica_refresh=2, report_to="tensorboard", logging_steps=2)
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    assert {"ica/scores", "ica/weights", "ica/scores_all"} <= set(events.Tags()["histograms"])
    per_log = events.Histograms("ica/weights")
    assert [e.step for e in per_log] == [2, 4]
    assert all(e.histogram_value.num == 8 for e in per_log)  # the 2 steps x 4 examples since the last log
    assert [e.step for e in events.Histograms("ica/scores_all")] == [0, 2]  # one per scoring of the 12 rows
    assert all(e.histogram_value.num == 12 for e in events.Histograms("ica/scores_all"))
