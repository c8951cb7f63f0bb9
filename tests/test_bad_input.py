"""Bad input and faults, as a table: each case names what a user does and what must happen, either a clear error
(an exception whose message names the argument, row or line and what is allowed) or the correct result. Add a row
whenever a new failure is found."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from testing_utils import chat_row, conv_pair, tiny_llama

from trl_ica import ICADPOConfig, ICADPOTrainer, ICASFTConfig, ICASFTTrainer, score_ica
from trl_ica.cli import main as cli
from trl_ica.embedded import convert_gguf
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import LogProbRequest

SFT = [chat_row(f"What is {i} plus 1?", f"It is {i + 1}.") for i in range(6)]
HOLDOUT = [chat_row(f"What is {i} plus 7?", f"It is {i + 7}.") for i in range(4)]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def scored_file(tmp_path, scores):
    return write_lines(
        tmp_path / "scored.jsonl", [{"prompt": f"q{i}", "completion": "a", "score": s} for i, s in enumerate(scores)]
    )


def select(tmp_path, *extra, scores=(0.1, 0.5, 0.9)):
    cli(["select", "--scores", scored_file(tmp_path, list(scores)), "--output", str(tmp_path / "out.jsonl"), *extra])


def score_random(tmp_path, *extra, data=None):
    path = write_lines(tmp_path / "d.jsonl", SFT) if data is None else data
    cli(["score", "--method", "random", "--model", "m", "--dataset", path, *extra])


def sft_trainer(tokenizer, tmp_path, train, **kwargs):
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    args = ICASFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1, **kwargs)
    return ICASFTTrainer(
        model, args=args, train_dataset=train, processing_class=tokenizer, holdout_dataset=Dataset.from_list(HOLDOUT)
    )


def nan_model(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    return model


def mixed_file(tmp_path):
    return write_lines(tmp_path / "mixed.jsonl", [SFT[0], {"messages": SFT[1]["prompt"] + SFT[1]["completion"]}])


# (case, what the user does, the message the error must carry)
CLEAR = {
    "select: threshold above every score": (
        lambda t, tok: select(t, "--mode", "threshold", "--threshold", "5"),
        r"No row scores at least `threshold`=5.0 \(the scores run from 0.1 to 0.9\)",
    ),
    "select: threshold nan": (
        lambda t, tok: select(t, "--mode", "threshold", "--threshold", "nan"),
        "`threshold` must be a number, got nan",
    ),
    "select: a string score": (
        lambda t, tok: select(t, "--ratio", "0.5", scores=(0.1, "high", 0.3)),
        r"`scores` must be numbers; found 'high' \(str\)",
    ),
    "select: output is the scores file": (
        lambda t, tok: cli(
            ["select", "--scores", scored_file(t, [1, 2]), "--ratio", "0.5", "--output", str(t / "scored.jsonl")]
        ),
        "is the input `--scores`",
    ),
    "score: output is the dataset": (
        lambda t, tok: score_random(t, "--output", str(t / "d.jsonl")),
        "is the input `--dataset`",
    ),
    "score: output exists": (
        lambda t, tok: [score_random(t, "--output", str(t / "o.jsonl")) for _ in range(2)],
        "exists; pass `--overwrite`",
    ),
    "score: a split a local file does not have": (
        lambda t, tok: score_random(t, "--output", str(t / "o.jsonl"), "--split", "test"),
        r"has no split 'test'; its splits are \['train'\]",
    ),
    "score: a malformed JSON Lines line": (
        lambda t, tok: (
            (t / "bad.jsonl").write_text(json.dumps(SFT[0]) + "\n{not json\n"),
            score_random(t, "--output", str(t / "o.jsonl"), data=str(t / "bad.jsonl")),
        ),
        r"bad.jsonl', line 2: not valid JSON",
    ),
    "score: a file mixing messages and prompt/completion rows": (
        lambda t, tok: cli(
            [
                "score",
                "--method",
                "loss",
                "--model",
                "smollm2-135m-instruct",
                "--dataset",
                mixed_file(t),
                "--output",
                str(t / "o.jsonl"),
            ]
        ),
        # datasets >= 5 reads the file with the missing columns as None, older releases refuse it: either way the
        # message names the two formats
        r"mixes row formats: (prompt/completion \(first at row 0\), messages \(first at row 1\)|line 2 has "
        r"columns \['messages'\] but line 1 has \['completion', 'prompt'\])",
    ),
    "score: a model folder that does not exist": (
        lambda t, tok: cli(
            [
                "score",
                "--method",
                "loss",
                "--model",
                str(t / "missing"),
                "--dataset",
                write_lines(t / "d.jsonl", SFT),
                "--output",
                str(t / "o.jsonl"),
            ]
        ),
        "missing' is not a model folder: no such directory",
    ),
    "score: --num-demos 0": (
        lambda t, tok: cli(
            [
                "score",
                "--method",
                "ica",
                "--model",
                "smollm2-135m-instruct",
                "--dataset",
                write_lines(t / "d.jsonl", SFT),
                "--holdout",
                write_lines(t / "h.jsonl", HOLDOUT),
                "--num-demos",
                "0",
                "--output",
                str(t / "o.jsonl"),
            ]
        ),
        r"`num_demos` must be a positive integer, at most the holdout's size, got 0",
    ),
    "score: --scoring-max-tokens 0": (
        lambda t, tok: cli(
            [
                "score",
                "--method",
                "loss",
                "--model",
                "smollm2-135m-instruct",
                "--dataset",
                write_lines(t / "d.jsonl", SFT),
                "--scoring-max-tokens",
                "0",
                "--output",
                str(t / "o.jsonl"),
            ]
        ),
        "`--scoring-max-tokens` must be a positive integer, got 0",
    ),
    "scoring: a token budget of 0": (
        lambda t, tok: score_requests(tiny_llama(), [LogProbRequest((1,), (2,), (3,))], max_batch_tokens=0),
        "`max_batch_tokens` must be a positive integer or None, got 0",
    ),
    "scoring: an unknown sharing": (
        lambda t, tok: score_requests(tiny_llama(), [LogProbRequest((1,), (2,), (3,))], sharing="trie"),
        r"`sharing` must be one of \['auto', 'tree', 'flat', 'none'\], got 'trie'",
    ),
    "scoring: batch_size 0": (
        lambda t, tok: score_requests(tiny_llama(), [LogProbRequest((1,), (2,), (3,))], batch_size=0),
        "`batch_size` must be a positive integer or None, got 0",
    ),
    "scoring: an empty prompt": (
        lambda t, tok: score_ica(
            tiny_llama(),
            tok,
            [SFT[0], {"prompt": " ", "completion": "x"}],
            HOLDOUT,
            ICAScoringOptions(form="difference", reduction="sum"),
        ),
        r"dataset row 1: the prompt is empty",
    ),
    "scoring: an implicit-prompt pair with nothing in common": (
        lambda t, tok: score_ica(
            tiny_llama(),
            tok,
            [{"chosen": "yes", "rejected": "no"}],
            HOLDOUT,
            ICAScoringOptions(form="difference", reduction="sum"),
        ),
        "dataset row 0: no `prompt` column, and `chosen` and `rejected` share no leading part",
    ),
    "scoring: a DatasetDict": (
        lambda t, tok: score_ica(
            tiny_llama(),
            tok,
            DatasetDict(train=Dataset.from_list(SFT)),
            HOLDOUT,
            ICAScoringOptions(form="difference", reduction="sum"),
        ),
        r"`dataset` is a DatasetDict of splits \['train'\]; pass one split, e.g. `dataset\['train'\]`",
    ),
    "scoring: a pandas DataFrame": (
        lambda t, tok: score_ica(
            tiny_llama(),
            tok,
            Dataset.from_list(SFT).to_pandas(),
            HOLDOUT,
            ICAScoringOptions(form="difference", reduction="sum"),
        ),
        r"`dataset` is a pandas DataFrame; convert it with `datasets.Dataset.from_pandas",
    ),
    "scoring: a model that produces NaN, conditioned form": (
        lambda t, tok: score_ica(
            nan_model(tok),
            tok,
            SFT,
            HOLDOUT,
            ICAScoringOptions(form="conditioned", reduction="mean"),
            show_progress=False,
        ),
        r"log-probabilities with demonstrations are not finite for 6 rows \(\[0, 1, 2, 3, 4\]\)",
    ),
    "scoring: a model that produces NaN, difference form": (
        lambda t, tok: score_ica(
            nan_model(tok),
            tok,
            SFT,
            HOLDOUT,
            ICAScoringOptions(form="difference", reduction="sum"),
            show_progress=False,
        ),
        "the model produced NaN or inf",
    ),
    "ICADPOTrainer on SFT rows": (
        lambda t, tok: ICADPOTrainer(
            tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id),
            args=ICADPOConfig(str(t), use_cpu=True, bf16=False, report_to="none"),
            train_dataset=Dataset.from_list(SFT),
            processing_class=tok,
            holdout_dataset=Dataset.from_list(HOLDOUT),
        ),
        r"has single responses \(columns \['prompt', 'completion'\]\), but ICADPOTrainer trains on preference "
        r"pairs .*use ICASFTTrainer",
    ),
    "ICASFTConfig: padding_free with max_length": (
        lambda t, tok: ICASFTConfig(str(t), use_cpu=True, bf16=False, padding_free=True, max_length=512),
        r"`padding_free=True` with `max_length`=512: .*Set `packing=True` .*`max_length=None`",
    ),
    "ICASFTTrainer: a demonstration template on chat rows under the default layout": (
        lambda t, tok: sft_trainer(
            tok,
            t,
            Dataset.from_list(SFT),
            ica_demo_template="Q: {prompt} A: {response}\n",
            ica_query_template="Q: {prompt} A:",
        ).train(),
        r"template .*was given for conversational rows, but `ica_demo_layout`='turns' \(the default\)",
    ),
    "convert_gguf of a file that does not exist": (
        lambda t, tok: convert_gguf(str(t / "missing.gguf"), str(t / "out")),
        r"`gguf`=.*missing\.gguf' is not a file; give the path of a \.gguf checkpoint",
    ),
    "ICASFTTrainer on preference pairs": (
        lambda t, tok: sft_trainer(tok, t, Dataset.from_list([conv_pair("q", "a", "b")] * 4)),
        "has pairs .*but ICASFTTrainer trains on single responses; use ICADPOTrainer or ICACPOTrainer",
    ),
}


@pytest.mark.parametrize("case", sorted(CLEAR))
def test_bad_input_gets_a_clear_error(case, tokenizer, tmp_path):
    action, message = CLEAR[case]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        action(tmp_path, tokenizer)


def test_json_output_is_json(tmp_path):
    score_random(tmp_path, "--output", str(tmp_path / "o.json"))
    rows = json.load(open(tmp_path / "o.json"))
    assert len(rows) == len(SFT) and all(np.isfinite(r["score"]) for r in rows)
