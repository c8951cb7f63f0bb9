"""Run by `tests/test_distributed.py` under `accelerate launch --num_processes 2 --cpu`; writes what it saw to --out.

Every process records the order of its backbone and LM-head calls (`calls-<rank>.json`); the main process writes the
sharded ICA scores, each process's lockstep scores against its own local scoring, three short training runs, and
one optimizer step of 16 rows split as 2 processes x 2 rows x 4 micro-batches for each trainer
(`step_<kind>_<refresh>`: its weights.jsonl and the parameters after the step).
"""

import argparse
import json
import os

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from testing_utils import CPU_ARGS, step_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_ica.scoring.engine as engine
import trl_ica.scoring.models as models
from trl_ica import ICADPOConfig, ICADPOTrainer, ICASFTConfig, ICASFTTrainer, score_ica
from trl_ica.cli.scenarios import chat_row, pair_row
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import LogProbRequest

COMMON = dict(
    CPU_ARGS,
    max_steps=2,
    per_device_train_batch_size=2,
    ica_num_demos=2,
    ica_scoring_batch_size=1,
    ica_score_form="difference",
    ica_reduction="sum",
    ica_weighting="batch_minmax",
)


def sft_data():
    train = [chat_row(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}." * (1 + i % 3)) for i in range(7)]
    holdout = [chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(4)]
    return train, holdout


def pair_data():
    wrong = [f"It is {2 * i + 1}, or so." * (1 + i % 2) for i in range(6)]
    return [pair_row(f"What is {i} times 2?", f"It is {2 * i}.", wrong[i]) for i in range(6)]


def record_calls(model, calls):
    """Append 'backbone' or 'head' to `calls` on every forward of the decoder or the output embedding."""
    lm = models.unwrap_causal_lm(model)
    lm.get_decoder().register_forward_hook(lambda *_: calls.append("backbone"))
    lm.get_output_embeddings().register_forward_hook(lambda *_: calls.append("head"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    state = PartialState(cpu=True)  # gloo on CPU: `accelerate launch --multi_gpu` runs torchrun, not a GPU check
    rank = state.process_index
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train, holdout = sft_data()
    calls: list[str] = []
    record_calls(model, calls)
    # 1. Sharded ICA scoring (the default under a multi-process launch): 7 rows over 2 processes, one per forward
    result = score_ica(
        model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, form="difference", reduction="sum"),
        batch_size=1,
        show_progress=False,
    )
    sharded_calls = list(calls)

    # 2. Lockstep: each process scores different requests; three scored tokens per LM-head call, so the processes
    # also differ in head calls per forward
    head_bytes = models.HEAD_BYTES
    models.HEAD_BYTES = 3 * 4 * model.config.vocab_size  # three float32 rows of logits
    own = [LogProbRequest((5, 6), (7,) * (1 + rank), tuple(range(10, 12 + 4 * rank + j))) for j in range(3 - 2 * rank)]
    calls.clear()
    stepped = score_requests(model, own, batch_size=1, show_progress=False, distributed="lockstep")
    lockstep_calls = list(calls)
    calls.clear()
    alone = score_requests(model, own, batch_size=1, show_progress=False, distributed="local")
    models.HEAD_BYTES = head_bytes
    # An out-of-memory back-off on one process (here rank 0's budget halved to 50) holds on every process
    budget = engine.ScoringBudget(100)
    if rank == 0:
        budget.back_off(100)
    agreed = score_requests(model, own, max_batch_tokens=budget, show_progress=False, distributed="lockstep")
    # Token log-probs, sharded: every process gets every request's, in the caller's order
    shared = [LogProbRequest((5, 6), (7,) * (1 + j), tuple(range(10, 12 + j))) for j in range(5)]
    per_token = score_requests(model, shared, batch_size=1, show_progress=False, per_token=True)
    with open(os.path.join(args.out, f"calls-{rank}.json"), "w") as f:
        json.dump(
            {
                "sharded": sharded_calls,
                "lockstep": lockstep_calls,
                "local_calls": list(calls),
                "lockstep_sums": stepped.sums.tolist(),
                "local_sums": alone.sums.tolist(),
                "scores": result.scores.tolist(),
                "budget_after": budget.tokens,
                "agreed_sums": agreed.sums.tolist(),
                "token_logps": [t.tolist() for t in per_token.tokens],
            },
            f,
        )

    # 3. Training: ICA-SFT with one refresh, online and sampled by its weights; ICA-DPO online
    runs = {}
    for name, trainer_class, config_class, data, fields in (
        ("sft_refresh", ICASFTTrainer, ICASFTConfig, Dataset.from_list(train), {}),
        ("sft_online", ICASFTTrainer, ICASFTConfig, Dataset.from_list(train), {"ica_refresh": "online"}),
        ("dpo_online", ICADPOTrainer, ICADPOConfig, Dataset.from_list(pair_data()), {"ica_refresh": "online"}),
        # the rows drawn by their weights, rescored before step 1: the scoring runs inside the sampler on both
        (
            "sft_sampling",
            ICASFTTrainer,
            ICASFTConfig,
            Dataset.from_list(train),
            {"ica_weight_mode": "sampling", "ica_weighting": "global_minmax", "ica_refresh": 2},
        ),
    ):
        out = os.path.join(args.out, name)
        policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        trainer = trainer_class(
            policy,
            args=config_class(output_dir=out, **{**COMMON, **fields}),
            train_dataset=data,
            processing_class=tokenizer,
            holdout_dataset=Dataset.from_list(holdout),
        )
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        changed = any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = {"global_step": trainer.state.global_step, "losses": losses, "changed": changed}
    # 4. One step of 16 rows as 2 processes x 2 x 4, for test_step_weights' comparison with one process
    for kind in ("sft", "dpo", "simpo"):
        for refresh in (1, "online"):
            out = os.path.join(args.out, f"step_{kind}_{refresh}")
            load = lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # noqa: E731
            trainer = step_trainer(kind, tokenizer, out, 2, 4, model=load(), ref_model=load(), ica_refresh=refresh)
            trainer.train()
            if state.is_main_process:
                params = {n: p.detach() for n, p in trainer.model.named_parameters()}
                torch.save(params, os.path.join(out, "params.pt"))
    # 5. A streamed training set with kNN demonstrations on the model's own embeddings: each process embeds its own
    # new rows (the processes' rows differ), with the model fixed (learning rate 0) so one embedding serves as the
    # reference; each process writes the demonstrations its rows got
    out = os.path.join(args.out, "streamed_knn")
    streamed = ICASFTTrainer(
        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
        args=ICASFTConfig(
            output_dir=out,
            **{**COMMON, "ica_refresh": "online", "ica_demo_selection": "knn", "learning_rate": 0.0, "max_steps": 3},
        ),
        train_dataset=IterableDataset.from_generator(lambda: iter(train)),
        processing_class=tokenizer,
        holdout_dataset=Dataset.from_list(holdout),
    )
    streamed.train()
    table = streamed.ica.builder.demo_indices
    seen = {int(i): table[i].tolist() for i in range(len(table)) if table[i, 0] >= 0}
    with open(os.path.join(args.out, f"streamed-{rank}.json"), "w") as f:
        json.dump(seen, f)
    gathered = gather_object([runs])
    if state.is_main_process:
        with open(os.path.join(args.out, "runs.json"), "w") as f:
            json.dump({"num_processes": state.num_processes, "runs": gathered}, f)
    state.wait_for_everyone()
    assert np.isfinite(result.scores).all()


if __name__ == "__main__":
    main()
