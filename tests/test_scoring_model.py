"""A scoring model of its own (`ica_scoring_model`, `scoring_model=`): the trainers weight with its scores, computed
on rows rendered by its own tokenizer, exactly as `score_ica` computes them under it; it is never trained, scores
once and is freed after an R = 1 scoring, and the run's files and card name it."""

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import CPU_ARGS, LOGP_ATOL, chat_row, dpo_pairs, tiny_llama, tiny_tokenizer

from trl_ica import (
    ICACPOTrainer,
    ICADPOConfig,
    ICADPOTrainer,
    ICASFTConfig,
    ICASFTTrainer,
    ICASimPOConfig,
    compute_ica_scores,
    score_ica,
)
from trl_ica.scoring.options import ICAScoringOptions

COMMON = dict(CPU_ARGS, max_steps=2, per_device_train_batch_size=4, learning_rate=0.05, dataloader_drop_last=False)
# The score: conditioned, per token, fixed demonstrations (the default's form; fixed keeps the test small)
SCORE = dict(ica_score_form="difference", ica_reduction="mean", ica_num_demos=2, ica_demo_selection="fixed")
# Another tokenizer and chat template than the trained model's: rows must be rendered by the scorer's own
SCORER_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ': ' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A tiny Llama of another seed with another tokenizer (vocabulary 300, another chat template), saved."""
    tokenizer = tiny_tokenizer(vocab_size=300, chat_template=SCORER_TEMPLATE)
    folder = tmp_path_factory.mktemp("scorer")
    tiny_llama(seed=3, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sft_data(n=8):
    train = [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 2)) for i in range(n)]
    holdout = [chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(4)]
    return Dataset.from_list(train), Dataset.from_list(holdout)


def trained_model(tokenizer):
    return tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def sft_trainer(tokenizer, folder, train=None, **fields):
    scoring = {k: fields.pop(k) for k in ("scoring_model", "scoring_processing_class") if k in fields}
    default_train, holdout = sft_data()
    args = ICASFTConfig(output_dir=str(folder), **{**COMMON, **SCORE, **fields})
    return ICASFTTrainer(
        trained_model(tokenizer),
        args=args,
        train_dataset=train or default_train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
        **scoring,
    )


def naive_scores(scorer_dir, train, holdout, **settings):
    """The scores `score_ica` gives under the scoring model loaded by hand, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(scorer_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(scorer_dir)
    options = ICAScoringOptions(
        **{"num_demos": 2, "demo_selection": "fixed", "form": "difference", "reduction": "sum", **settings}
    )
    return score_ica(model, tokenizer, train, holdout, options, show_progress=False).scores


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_sft_weights_with_the_scoring_models_scores_and_frees_it(tokenizer, tmp_path, scorer_dir):
    trainer = sft_trainer(tokenizer, tmp_path, ica_scoring_model=scorer_dir, ica_weighting="batch_minmax")
    scorer = weakref.ref(trainer.ica.scorer.model)
    assert not any(p.requires_grad for p in trainer.ica.scorer.model.parameters())
    # the builder renders with the scorer's tokenizer: its chat template's words are in the requests
    request = trainer.ica.builder.conditioned(0)
    assert "### user:" in trainer.ica.scorer.tokenizer.decode(list(request.prefix + request.context))
    trainer.train()
    gc.collect()
    assert trainer.ica.scorer is None and scorer() is None  # freed after its one scoring, nothing holds it
    train, holdout = sft_data()
    expected = naive_scores(scorer_dir, train, holdout, form="difference", reduction="mean")
    records = read_lines(tmp_path / "ica" / "refresh-0.jsonl")
    np.testing.assert_allclose([r["score"] for r in records], expected, atol=LOGP_ATOL, rtol=0)
    assert {r["scoring_model"] for r in records} == {scorer_dir}
    # under the trained model (and its tokenizer) the same rows have other log-probabilities, by whole nats
    own = score_ica(
        trained_model(tokenizer).eval(),
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, demo_selection="fixed", reduction="mean", form="difference"),
        show_progress=False,
    )
    logp = np.array([r["logp_conditioned"] for r in records])
    assert np.abs(own.logp_conditioned - logp).min() > 1.0
    weights = read_lines(tmp_path / "ica" / "weights.jsonl")
    scores = np.array([r["score"] for r in records])
    for record in weights:
        assert record["score"] == pytest.approx(scores[record["ica_index"]], abs=LOGP_ATOL)
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert f"| `ica_scoring_model` | `{scorer_dir}` |" in card and "under the scoring model" in card


def test_a_loaded_scoring_model_and_the_holdouts_own_scores(tokenizer, tmp_path, scorer_dir):
    """`scoring_model=` takes a loaded model (its tokenizer loaded from its folder); `holdout_quantile` compares the
    rows with the holdout's own scores under the same scorer."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(scorer_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    trainer = sft_trainer(
        tokenizer, tmp_path, scoring_model=loaded, ica_weighting="holdout_quantile", ica_score_form="conditioned"
    )
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())  # never trained
    train, holdout = sft_data()
    expected = naive_scores(scorer_dir, train, holdout, form="conditioned", reduction="mean")
    records = read_lines(tmp_path / "ica" / "refresh-0.jsonl")
    np.testing.assert_allclose([r["score"] for r in records], expected, atol=LOGP_ATOL, rtol=0)
    held = read_lines(tmp_path / "ica" / "holdout-0.jsonl")
    assert len(held) == 4 and {r["scoring_model"] for r in held} == {scorer_dir}


def test_online_scores_each_steps_rows_with_the_fixed_scorer_and_the_holdout_once(tokenizer, tmp_path, scorer_dir):
    trainer = sft_trainer(
        tokenizer,
        tmp_path,
        ica_scoring_model=scorer_dir,
        ica_refresh="online",
        ica_weighting="holdout_quantile",
        max_steps=2,
    )
    trainer.train()
    assert trainer.ica.scorer is not None  # online, it scores every step
    train, holdout = sft_data()
    expected = naive_scores(scorer_dir, train, holdout, form="difference", reduction="mean")
    records = read_lines(tmp_path / "ica" / "weights.jsonl")
    assert len(records) == 8
    for record in records:  # the rows of a later step get the scores of a fixed model, not of a trained one
        assert record["score"] == pytest.approx(expected[record["ica_index"]], abs=LOGP_ATOL)
    assert sorted(p.name for p in (tmp_path / "ica").glob("holdout-*.jsonl")) == ["holdout-0.jsonl"]


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_preference_trainers_score_pairs_with_the_scoring_model(tokenizer, tmp_path, scorer_dir, kind):
    train, holdout = dpo_pairs(8)
    settings = {**COMMON, **SCORE, "max_steps": 1, "ica_weighting": "batch_minmax", "ica_scoring_model": scorer_dir}
    if kind == "dpo":
        trainer = ICADPOTrainer(
            trained_model(tokenizer),
            trained_model(tokenizer).eval(),
            args=ICADPOConfig(str(tmp_path), **settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    else:
        trainer = ICACPOTrainer(
            trained_model(tokenizer),
            args=ICASimPOConfig(str(tmp_path), **settings, max_length=256),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    trainer.train()
    expected = naive_scores(scorer_dir, train, holdout, form="difference", reduction="mean")
    records = read_lines(tmp_path / "ica" / "refresh-0.jsonl")
    np.testing.assert_allclose([r["score"] for r in records], expected, atol=2 * LOGP_ATOL, rtol=0)


def test_compute_ica_scores_loads_a_scoring_model_by_name(scorer_dir):
    train, holdout = sft_data()
    by_name = compute_ica_scores(
        scorer_dir,
        None,
        train,
        holdout,
        num_demos=2,
        demo_selection="fixed",
        form="difference",
        reduction="sum",
        show_progress=False,
    )
    expected = naive_scores(scorer_dir, train, holdout)
    np.testing.assert_allclose(by_name, expected, atol=LOGP_ATOL, rtol=0)


def test_a_resumed_run_refuses_another_scoring_model(tokenizer, tmp_path, scorer_dir):
    trainer = sft_trainer(tokenizer, tmp_path, ica_scoring_model=scorer_dir)
    other = sft_trainer(tokenizer, tmp_path / "other")
    assert trainer.ica.fingerprint()["scoring model"] == repr(scorer_dir)
    assert "scoring model" not in other.ica.fingerprint()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ica_refresh": "3"}, r"`ica_refresh`=3 rescores the training set .* every scoring would give the same"),
        ({"scoring_model": "SCORER"}, r"Give the scoring model once: `scoring_model` or `ica_scoring_model`"),
        (
            {"ica_scoring_model": None, "scoring_processing_class": "TOKENIZER"},
            r"`scoring_processing_class` is the tokenizer of `scoring_model`, which is not given",
        ),
        ({"ica_scoring_model": "/no/such/folder"}, r"`ica_scoring_model`='/no/such/folder' is not a model folder"),
        (
            {"ica_scoring_model": None, "scoring_model": 3},
            r"`ica_scoring_model` must be a Hub id or a model folder, got int",
        ),
    ],
)
def test_what_a_scoring_model_refuses(tokenizer, tmp_path, scorer_dir, fields, message):
    fields = {"ica_scoring_model": scorer_dir, **fields}
    fields = {k: scorer_dir if v == "SCORER" else tokenizer if v == "TOKENIZER" else v for k, v in fields.items()}
    with pytest.raises(ValueError, match=message):
        sft_trainer(tokenizer, tmp_path, **fields)


def test_pre_tokenised_rows_are_refused_with_a_scoring_model(tokenizer, tmp_path, scorer_dir):
    ids = [tokenizer(f"What is {i}? It is {i}.")["input_ids"] for i in range(8)]
    train = Dataset.from_dict({"input_ids": ids})
    with pytest.raises(ValueError, match=r"pre-tokenised \(`input_ids`\) with the trained model's"):
        sft_trainer(tokenizer, tmp_path, train=train, ica_scoring_model=scorer_dir)
