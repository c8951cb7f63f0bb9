"""Two processes under a real `accelerate launch --num_processes 2 --cpu` (gloo): sharded scoring gives the
one-process scores, the processes' model calls stay in step, and the ICA trainers train with global-batch weights."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from distributed_worker import sft_data
from testing_utils import GRAD_TOL, REGROUPED_ATOL, TOKEN_LOGP_ATOL, WEIGHT_ATOL, minmax_weight_atol

from trl_ica import score_ica
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import LogProbRequest

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.multiprocess]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*script, timeout=900):
    """`accelerate launch` with two processes; on a machine without GPUs they run on the CPU with gloo (torchrun)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *script,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model


@pytest.fixture(scope="module")
def launched(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("distributed")
    launch(
        os.path.join(os.path.dirname(__file__), "distributed_worker.py"), "--model", str(model_dir), "--out", str(out)
    )
    ranks = [json.loads((out / f"calls-{r}.json").read_text()) for r in range(2)]
    return model_dir, out, ranks, json.loads((out / "runs.json").read_text())


def test_two_process_scores_equal_one_process_scores(launched):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _, ranks, _ = launched
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, holdout = sft_data()
    single = score_ica(
        model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, form="difference", reduction="sum"),
        batch_size=1,
        show_progress=False,
    ).scores
    for rank in ranks:  # every process gets every row's score
        np.testing.assert_allclose(rank["scores"], single, atol=REGROUPED_ATOL, rtol=0)
    assert np.ptp(single) > 0


def test_sharded_token_log_probs_reach_every_process_in_order(launched):
    from transformers import AutoModelForCausalLM

    model_dir, _, ranks, _ = launched
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shared = [LogProbRequest((5, 6), (7,) * (1 + j), tuple(range(10, 12 + j))) for j in range(5)]
    single = score_requests(model, shared, batch_size=1, show_progress=False, per_token=True).tokens
    for rank in ranks:
        assert [len(t) for t in rank["token_logps"]] == [len(r.response) for r in shared]
        for got, want in zip(rank["token_logps"], single):
            np.testing.assert_allclose(got, want, atol=TOKEN_LOGP_ATOL, rtol=0)


def test_streamed_knn_rows_get_their_own_demonstrations_on_every_process(launched):
    """Each process embeds the rows it streams; every row's demonstrations are those one process chooses for it
    with the same (untrained) model's embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_ica.scoring.demonstrations import model_embeddings, select_demos

    model_dir, out, _, _ = launched
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, holdout = sft_data()
    questions, held = [r["prompt"][0]["content"] for r in train], [r["prompt"][0]["content"] for r in holdout]
    embed = lambda texts: model_embeddings(model, tokenizer, texts)  # noqa: E731
    expected = select_demos(questions, held, 2, "knn", embed=embed)
    ranks = [json.loads((out / f"streamed-{r}.json").read_text()) for r in range(2)]
    assert all(ranks) and len(set(ranks[0]) | set(ranks[1])) > len(ranks[0])  # the processes streamed other rows
    for seen in ranks:
        for index, demos in seen.items():
            assert demos == expected[int(index)].tolist(), index


def test_processes_make_the_same_model_calls_in_the_same_order(launched):
    _, _, (r0, r1), _ = launched
    for key in ("sharded", "lockstep"):
        assert r0[key] == r1[key], key
        assert r0[key].count("backbone") > 1 and "head" in r0[key]
    # Without lockstep the two processes' work differs, in forwards and in head calls per forward
    assert r0["local_calls"] != r1["local_calls"]
    assert r0["local_calls"].count("backbone") != r1["local_calls"].count("backbone")


def test_a_scoring_budget_backed_off_on_one_process_holds_on_all(launched):
    _, _, ranks, _ = launched
    assert [r["budget_after"] for r in ranks] == [50, 50]
    for r in ranks:  # the smaller batches give the same sums
        np.testing.assert_allclose(r["agreed_sums"], r["local_sums"], atol=REGROUPED_ATOL, rtol=0)


def test_an_out_of_memory_error_on_one_process_backs_off_or_stops_every_process(model_dir, tmp_path):
    """An error injected inside rank 1's forwards (tests/oom_worker.py); a process left waiting would hang the launch
    until its time limit."""
    launch(
        os.path.join(os.path.dirname(__file__), "oom_worker.py"),
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path),
        timeout=300,
    )
    ranks = [json.loads((tmp_path / f"oom-{r}.json").read_text()) for r in range(2)]
    # rank 1 failed inside its forward of all six rows (6 x 17 positions) and halved that; rank 0 took the same budget
    assert ranks[0]["budget_after"] == ranks[1]["budget_after"] == 6 * 17 // 2
    for rank in ranks:  # rank 1's retry ran smaller batches: the same sums up to regrouping
        np.testing.assert_allclose(rank["retried"], rank["reference"], atol=REGROUPED_ATOL, rtol=0)
    # a single sequence cannot be retried: both processes stopped with the error, neither waits for the other
    assert "Out of memory" in ranks[1]["stopped"] and "a single sequence" in ranks[1]["stopped"]
    assert "Another process ran out of memory" in ranks[0]["stopped"]


def test_lockstep_scores_equal_local_scores(launched):
    for rank in launched[2]:
        # the same batches through the same forward; lockstep only adds empty calls on the process without work
        np.testing.assert_allclose(rank["lockstep_sums"], rank["local_sums"], atol=REGROUPED_ATOL, rtol=0)
        assert len(rank["lockstep_sums"]) > 0


def test_two_process_trainers_train_with_weights_over_the_global_batch(launched):
    _, out, _, runs = launched
    assert runs["num_processes"] == 2
    for name in ("sft_refresh", "sft_online", "dpo_online", "sft_sampling"):
        for rank in runs["runs"]:
            assert rank[name]["global_step"] == 2 and rank[name]["changed"], (name, rank[name])
            assert all(np.isfinite(rank[name]["losses"])) and rank[name]["losses"]
    # One refresh, sharded: every row scored once, written by the main process alone
    rows = [json.loads(line) for line in open(out / "sft_refresh" / "ica" / "refresh-0.jsonl")]
    assert sorted(r["ica_index"] for r in rows) == list(range(7))
    for name in ("sft_online", "dpo_online"):
        records = [json.loads(line) for line in open(out / name / "ica" / "weights.jsonl")]
        for step in (0, 1):
            batch = [r for r in records if r["step"] == step]
            assert len(batch) == 4, (name, step)  # 2 processes x 2 rows, written once
            scores = np.array([r["score"] for r in batch])
            assert np.ptp(scores) > 0
            # Min-max over the global batch of 4, not over each process's 2 rows
            expected = (scores - scores.min()) / np.ptp(scores)
            np.testing.assert_allclose([r["weight"] for r in batch], expected, atol=WEIGHT_ATOL, rtol=0)
            assert not np.isin(expected, [0.0, 1.0]).all(), "a case that per-process min-max would also pass"


def test_two_processes_draw_one_weighted_order_and_deal_it_out(launched):
    """`ica_weight_mode="sampling"` on 2 processes: both draw the one order of the weights (batches of 2 dealt out in
    turn), and the scoring before step 1 (inside the sampler, on both) redraws the rest of the epoch from it."""
    from trl_ica.scoring.weighting import compute_weights, score_range
    from trl_ica.trainer.sampling import epoch_order

    _, out, _, _ = launched
    folder = out / "sft_sampling" / "ica"
    orders = []
    for k in (0, 1):
        scores = np.array(
            [
                r["score"]
                for r in sorted(map(json.loads, open(folder / f"refresh-{k}.jsonl")), key=lambda r: r["ica_index"])
            ]
        )
        weights = compute_weights(scores, "global_minmax", global_range=score_range(scores))
        assert 0 < (weights > 0).sum() < 7  # a row of weight 0 exists, so the draw is not the plain permutation
        orders.append(epoch_order(weights, 0, 0))  # seed 0, epoch 0: the run's seed, as the stock sampler takes it
    records = [json.loads(line) for line in open(folder / "weights.jsonl")]
    step0 = [r["ica_index"] for r in records if r["step"] == 0]
    step1 = [r["ica_index"] for r in records if r["step"] == 1]
    assert step0 == orders[0][:4]  # process 0's batch, then process 1's: positions 0-1 and 2-3
    assert step1[:3] == orders[1][4:7]  # the rescored order from position 4 (process 1's batch padded after)


@pytest.mark.parametrize("refresh", [1, "online"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "simpo"])
def test_two_processes_get_the_weights_and_update_of_one(launched, tokenizer, tmp_path, kind, refresh):
    """One optimizer step of 16 rows as 2 processes x 2 rows x 4 micro-batches: the weights and the parameters
    after the step equal those of one process training on all 16 rows at once."""
    from testing_utils import STEP_ROWS, step_pair_rows, step_sft_rows, step_trainer

    _, out, _, _ = launched
    folder = out / f"step_{kind}_{refresh}"
    records = [json.loads(line) for line in open(folder / "ica" / "weights.jsonl")]
    assert sorted(r["ica_index"] for r in records) == list(range(STEP_ROWS))  # the global step, written once
    single = step_trainer(kind, tokenizer, tmp_path, STEP_ROWS, 1, ica_refresh=refresh)
    single.train()
    alone = {r["ica_index"]: r for r in map(json.loads, open(tmp_path / "ica" / "weights.jsonl"))}
    # Online, the two splits score the rows in different batches, so fp32 rounding differs: each response token's
    # log-probability carries about 16 eps x log(vocab) of it, summed over a row's response tokens in both passes.
    # Min-max weights move by at most 3 x that / the step's score range.
    rows, _ = step_sft_rows() if kind == "sft" else step_pair_rows()
    responses = [k for k in ("completion", "chosen", "rejected") if k in rows.column_names]
    tokens = max(sum(len(tokenizer(row[k][-1]["content"])["input_ids"]) + 2 for k in responses) for row in rows)
    score_tol = 2 * tokens * 16 * np.finfo(np.float32).eps * np.log(len(tokenizer))
    scores = np.array([alone[r["ica_index"]]["score"] for r in records])
    np.testing.assert_allclose([r["score"] for r in records], scores, atol=score_tol, rtol=0)
    np.testing.assert_allclose(
        [r["weight"] for r in records],
        [alone[r["ica_index"]]["weight"] for r in records],
        atol=3 * score_tol / np.ptp(scores),
        rtol=0,
    )
    params = torch.load(folder / "params.pt")
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), **GRAD_TOL, msg=name)


def test_cli_score_under_two_processes_writes_every_row_once(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_ica.data_io import load_rows
    from trl_ica.selection.baselines import score_dataset

    train, _ = sft_data()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in train))
    output = tmp_path / "scored.jsonl"
    done = launch(
        "-m",
        "trl_ica.cli",
        "score",
        "--method",
        "loss",
        "--model",
        str(model_dir),
        "--dataset",
        str(path),
        "--output",
        str(output),
        "--batch-size",
        "1",
    )
    assert done.stdout.count('"rows": 7') == 1  # the summary is printed by the main process alone
    rows = load_rows(str(output))
    assert len(rows) == 7 and rows["prompt"] == [r["prompt"] for r in train]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    single = score_dataset("loss", model, AutoTokenizer.from_pretrained(model_dir), train)
    np.testing.assert_allclose(rows["score"], single, atol=REGROUPED_ATOL, rtol=0)


def test_fsdp2_sharded_model_scores_and_trains_like_the_unsharded_model(tmp_path):
    """FSDP2 on gloo: decoder layers gather their shards in their own forward, which the processes reach in step;
    the embeddings, final norm and LM head that scoring calls around the root module are gathered for it. Training
    through the root after scoring (which calls the layers first) works, with online scoring at every step, and
    ends with the one-process scores, weights and parameters."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(os.path.dirname(__file__), "fsdp_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"fsdp-{rank}.json").read_text())
        assert out["local_shapes"] != out["full_shapes"]  # really sharded
        assert out["demos_equal"]
        np.testing.assert_allclose(out["scores"], out["reference"], atol=REGROUPED_ATOL, rtol=0)
        trained, alone = out["trained"], out["alone"]
        np.testing.assert_allclose(trained["first"], alone["first"], atol=REGROUPED_ATOL, rtol=0)
        for step, (scores, weights) in enumerate(zip(alone["step_scores"], alone["weights"])):
            np.testing.assert_allclose(trained["step_scores"][step], scores, atol=REGROUPED_ATOL, rtol=0)
            atol = minmax_weight_atol(scores, REGROUPED_ATOL)
            np.testing.assert_allclose(trained["weights"][step], weights, atol=atol, rtol=0)
        moved = max(np.abs(np.subtract(a, b)).max() for a, b in zip(alone["parameters"], out["initial"]))
        gap = max(np.abs(np.subtract(a, b)).max() for a, b in zip(trained["parameters"], alone["parameters"]))
        assert moved > 1e-3 and gap < 1e-3 * moved


def test_the_ddp_accelerate_config_launches_the_lora_recipe_on_two_processes(model_dir, tmp_path):
    from testing_utils import write_recipe_data

    root = os.path.dirname(os.path.dirname(__file__))
    write_recipe_data(tmp_path, preference=False)
    out = tmp_path / "run"
    launch(
        "--config_file",
        os.path.join(root, "recipes", "accelerate", "multi_gpu.yaml"),
        "-m",
        "trl_ica.launch",
        "sft",
        "--config",
        os.path.join(root, "recipes", "sft_lora.yaml"),
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(tmp_path / "train.jsonl"),
        "--holdout_name",
        str(tmp_path / "holdout.jsonl"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--max_length",
        "256",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--logging_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
    )
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # Two processes of 2 rows make a global batch of 4, and each step records each of its rows once
    records = [json.loads(line) for line in open(out / "ica" / "weights.jsonl")]
    assert [sum(r["step"] == s for r in records) for s in (0, 1)] == [4, 4]
    scored = [json.loads(line) for line in open(out / "ica" / "refresh-0.jsonl")]
    assert sorted(r["ica_index"] for r in scored) == list(range(6))
    assert os.path.isfile(out / "adapter_config.json")
