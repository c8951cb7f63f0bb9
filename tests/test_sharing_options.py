"""How scoring shares demonstration prefixes, chosen by the user: `ica_scoring_sharing` and `ica_scoring_overhead` in
the trainers, `--scoring-sharing` and `--forward-overhead` in `trl-ica score`."""

import json

import numpy as np
import pytest
from datasets import Dataset
from testing_utils import CPU_ARGS, REGROUPED_ATOL, chat_row, score_files, tiny_llama

import trl_ica.scoring.ica as ica_module
from trl_ica import ICASFTConfig, ICASFTTrainer

COMMON = dict(CPU_ARGS, max_steps=1, per_device_train_batch_size=4, ica_num_demos=2, ica_demo_selection="knn")


def data():
    train = Dataset.from_list([chat_row(f"What is {i} plus {i + 1}?", f"It is {2 * i + 1}.") for i in range(8)])
    holdout = Dataset.from_list([chat_row(f"What is {i} plus 7?", f"It is {i + 7}.") for i in range(5)])
    return train, holdout


@pytest.mark.parametrize("sharing, overhead", [("tree", None), ("none", None), ("auto", 1000.0), ("auto", "measure")])
def test_the_trainer_scores_with_the_sharing_and_overhead_asked_for(
    tokenizer, tmp_path, monkeypatch, sharing, overhead
):
    seen = []
    original = ica_module.score_requests
    monkeypatch.setattr(ica_module, "score_requests", lambda *a, **k: seen.append(k) or original(*a, **k))
    train, holdout = data()
    runs = {}
    for name, fields in (("default", {}), ("asked", dict(ica_scoring_sharing=sharing, ica_scoring_overhead=overhead))):
        seen.clear()
        model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        args = ICASFTConfig(output_dir=str(tmp_path / name), **COMMON, **fields)
        trainer = ICASFTTrainer(
            model, args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=holdout
        )
        trainer.train()
        assert seen and all(k["sharing"] == fields.get("ica_scoring_sharing", "auto") for k in seen)
        assert all(k["forward_overhead"] == fields.get("ica_scoring_overhead") for k in seen)
        runs[name] = [json.loads(line)["score"] for line in open(tmp_path / name / "ica" / "refresh-0.jsonl")]
    np.testing.assert_allclose(runs["asked"], runs["default"], atol=REGROUPED_ATOL, rtol=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(ica_scoring_sharing="deep"),
            r"`ica_scoring_sharing` must be one of \['auto', 'tree', 'flat', 'none'\], "
            "got 'deep'",
        ),
        (
            dict(ica_scoring_overhead=-1),
            "`ica_scoring_overhead` must be None, a number of tokens >= 0 or 'measure', got -1",
        ),
        (dict(ica_scoring_overhead="fast"), "got 'fast'"),
    ],
)
def test_bad_sharing_settings_are_refused_by_name(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        ICASFTConfig(output_dir=str(tmp_path), use_cpu=True, **fields)


def test_an_overhead_from_the_command_line_is_a_number(tmp_path):
    config = ICASFTConfig(output_dir=str(tmp_path), use_cpu=True, ica_scoring_overhead="1000")
    assert config.ica_scoring_overhead == 1000


def test_cli_sharing_flags_reach_the_engine_and_bad_ones_are_refused(tmp_path, tokenizer, monkeypatch):
    from trl_ica.cli.main import main

    train, holdout = data()
    files = score_files(tmp_path, tokenizer, train, holdout)
    no_holdout = files[:4]  # `--model` and `--dataset`
    seen = []
    original = ica_module.score_requests
    monkeypatch.setattr(ica_module, "score_requests", lambda *a, **k: seen.append(k) or original(*a, **k))
    common = ["score", "--method", "ica", *files, "--num-demos", "2"]
    main([*common, "--output", str(tmp_path / "a.jsonl"), "--scoring-sharing", "flat", "--forward-overhead", "500"])
    assert seen and all(k["sharing"] == "flat" and k["forward_overhead"] == 500.0 for k in seen)
    with pytest.raises(ValueError, match=r"`--forward-overhead` must be a number of tokens >= 0 or 'measure', got"):
        main([*common, "--output", str(tmp_path / "b.jsonl"), "--forward-overhead", "-2"])
    with pytest.raises(ValueError, match="choose how `ica` shares demonstration prefixes; `method='loss'` has none"):
        main(
            [
                "score",
                "--method",
                "loss",
                *no_holdout,
                "--output",
                str(tmp_path / "c.jsonl"),
                "--scoring-sharing",
                "none",
            ]
        )
