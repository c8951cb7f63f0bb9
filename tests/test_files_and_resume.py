"""Nothing lost, nothing stale: files written whole, outputs that never replace inputs, resume that refuses state
computed for other data, logs that restart with a new run, holdout rows that also sit in the training set."""

import json
import os
import signal
import subprocess
import sys

import pytest
from datasets import Dataset
from testing_utils import CPU_ARGS, SUMMED_DIFFERENCE, chat_row, tiny_llama

from trl_ica import ICASFTConfig, ICASFTTrainer, score_ica
from trl_ica.cli import main as cli
from trl_ica.data_io import write_json, write_rows, written_whole
from trl_ica.scoring.options import ICAScoringOptions

COMMON = dict(CPU_ARGS, per_device_train_batch_size=4)


def rows(n=12, offset=0):
    return Dataset.from_list(
        [chat_row(f"What is {i} plus {i + 1}?", f"It is {2 * i + 1}.") for i in range(offset, offset + n)]
    )


def holdout(n=5):
    return Dataset.from_list([chat_row(f"What is {i} plus 7?", f"It is {i + 7}.") for i in range(n)])


def trainer(tokenizer, out, train=None, held=None, **kwargs):
    args = ICASFTConfig(
        output_dir=str(out), **{**COMMON, **SUMMED_DIFFERENCE, "max_steps": 3, "save_strategy": "no", **kwargs}
    )
    model = tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    return ICASFTTrainer(
        model, args=args, train_dataset=train or rows(), processing_class=tokenizer, holdout_dataset=held or holdout()
    )


def test_an_error_while_writing_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), written_whole(str(path)) as temporary:
        with open(temporary, "w") as f:
            f.write("half of the new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    write_json({"a": 1}, str(path))
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["out.jsonl"]


#: A process that writes 1000 rows with `write_rows` and is killed by SIGTERM at a chosen point: halfway through
#: writing the temporary file, just before it is moved onto the output, or just after.
KILLED_WRITER = """
import os, signal, sys
from datasets import Dataset
from trl_ica.data_io import write_rows

point, path = sys.argv[1], sys.argv[2]
rows = Dataset.from_list([{"i": i, "text": "x" * 40} for i in range(1000)])
die = lambda: os.kill(os.getpid(), signal.SIGTERM)
replace, to_json = os.replace, Dataset.to_json
if point == "writing":
    Dataset.to_json = lambda self, target, **kw: (to_json(self.select(range(500)), target, **kw), die())
elif point == "before_replace":
    os.replace = lambda a, b: die()
else:
    os.replace = lambda a, b: (replace(a, b), die())
write_rows(rows, path)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("point", ["writing", "before_replace", "after_replace"])
def test_sigterm_at_any_point_of_a_write_leaves_a_whole_file_or_none(tmp_path, point, existing):
    """Killed while the rows are written or before the move, the output is what it was (absent, or the old whole
    file); killed after the move, it is the whole new file; never a part of one."""
    path = tmp_path / "scores.jsonl"
    if existing:
        write_rows(Dataset.from_list([{"i": -1, "text": "old"}]), str(path))
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, point, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr.decode()[-2000:]
    if point == "after_replace":
        lines = path.read_text().splitlines()
        assert len(lines) == 1000 and [json.loads(line)["i"] for line in lines] == list(range(1000))
    elif existing:
        assert path.read_text().splitlines() == ['{"i":-1,"text":"old"}']
    else:
        assert not path.exists()


def test_json_output_is_one_array(tmp_path):
    write_rows(Dataset.from_list([{"a": 1}, {"a": 2}]), str(tmp_path / "x.json"))
    assert json.load(open(tmp_path / "x.json")) == [{"a": 1}, {"a": 2}]


def test_cli_never_writes_over_an_input_and_asks_before_replacing_an_output(tmp_path):
    data = tmp_path / "d.jsonl"
    rows(8).to_json(data)
    before = data.read_text()
    score = ["score", "--method", "random", "--model", "m", "--dataset", str(data)]
    with pytest.raises(ValueError, match=r"`--output`=.*d.jsonl' is the input `--dataset`"):
        cli([*score, "--output", str(data)])
    assert data.read_text() == before
    cli([*score, "--output", str(tmp_path / "s.jsonl")])
    with pytest.raises(ValueError, match=r"s.jsonl' exists; pass `--overwrite` to replace it"):
        cli([*score, "--output", str(tmp_path / "s.jsonl")])
    cli([*score, "--output", str(tmp_path / "s.jsonl"), "--overwrite"])
    scored = (tmp_path / "s.jsonl").read_text()
    with pytest.raises(ValueError, match=r"is the input `--scores`"):
        cli(["select", "--scores", str(tmp_path / "s.jsonl"), "--ratio", "0.5", "--output", str(tmp_path / "s.jsonl")])
    assert (tmp_path / "s.jsonl").read_text() == scored
    cli(["select", "--scores", str(tmp_path / "s.jsonl"), "--ratio", "0.5", "--output", str(tmp_path / "k.json")])
    assert len(json.load(open(tmp_path / "k.json"))) == 4


def test_resume_refuses_state_computed_for_other_data_or_settings(tokenizer, tmp_path):
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    trainer(tokenizer, tmp_path, **settings).train()
    checkpoint = str(tmp_path / "checkpoint-2")
    cases = [
        (dict(train=rows(offset=100)), r"other data or settings \(training rows\)"),
        (dict(held=holdout(6)), r"\(holdout rows\)"),
        (dict(ica_num_demos=2), r"ica_num_demos: checkpoint 3, now 2"),
        (dict(ica_score_form="conditioned", ica_reduction="mean"), r"ica_reduction: checkpoint 'sum', now 'mean'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer(tokenizer, tmp_path, **settings, **kwargs).train(resume_from_checkpoint=checkpoint)
    trainer(tokenizer, tmp_path, **settings, ica_scoring_batch_size=2).train(resume_from_checkpoint=checkpoint)


def test_a_new_run_in_the_same_output_dir_starts_its_files_afresh(tokenizer, tmp_path):
    trainer(tokenizer, tmp_path, max_steps=4, ica_refresh=2).train()
    assert os.path.isfile(tmp_path / "ica" / "refresh-1.jsonl")
    again = trainer(tokenizer, tmp_path, max_steps=2)
    again.train()
    logged = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert sorted({r["step"] for r in logged}) == [0, 1] and len(logged) == 8  # this run's 2 steps x 4 rows only
    assert not os.path.exists(tmp_path / "ica" / "refresh-1.jsonl")  # the first run's second scoring is gone


def test_a_run_shorter_than_its_refresh_count_scores_once_per_step_and_warns(tokenizer, tmp_path, caplog):
    run = trainer(tokenizer, tmp_path, max_steps=2, ica_refresh=3)
    calls = []
    original = run.ica._score_all
    run.ica._score_all = lambda model, builder: calls.append(run.state.global_step) or original(model, builder)
    with caplog.at_level("WARNING"):
        run.train()
    assert calls == [0, 1]  # never twice at one step
    assert "ica_refresh=3, but training runs 2 optimizer step(s): the training set is scored 2 time(s)" in caplog.text


def test_holdout_rows_in_the_training_set_are_not_their_own_demonstrations(chat_model, tokenizer):
    held = holdout(5)
    train = Dataset.from_list(list(rows(6)) + [held[1], held[3]])
    with pytest.warns(UserWarning, match=r"2 of 8 training examples also appear in the holdout \(rows \[6, 7\]\)"):
        result = score_ica(
            chat_model,
            tokenizer,
            train,
            held,
            ICAScoringOptions(num_demos=3, form="difference", reduction="sum"),
            show_progress=False,
        )
    assert 1 not in result.demo_indices[6] and 3 not in result.demo_indices[7]
    with pytest.warns(UserWarning, match="also appear in the holdout"):
        fixed = score_ica(
            chat_model,
            tokenizer,
            train,
            held,
            ICAScoringOptions(num_demos=3, demo_selection="fixed", form="difference", reduction="sum"),
            show_progress=False,
        )
    assert 1 not in fixed.demo_indices[6] and 3 not in fixed.demo_indices[7]
