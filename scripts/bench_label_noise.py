"""SFT label noise where the noise hurts: does ICA weighting recover the gap between uniform and clean-only training?

A reasoning-gym task (default `basic_arithmetic`, one-digit operands) whose pool has a `--noise` share of answers
replaced by answers of another task (default `family_relationships`: the wrong kind of answer, as when a data
pipeline mixes its sources); a clean holdout and test split of the task. SmolLM2-135M-Instruct, LoRA on the top
`--top-layers` layers, the same steps for every method:

- `uniform`: stock SFT on the noisy pool; `oracle`: stock SFT on its clean rows only;
- `ica`: ICA weights, the paper's score (difference, sum), step-level batch min-max, R = 1, k = 3 fixed demos;
- `ica_conditioned`: the same with `ica_score_form="conditioned"`, `ica_reduction="mean"`;
- `random_weights`: the same trainer and weighting fed uniformly random scores (weights of the same spread that
  carry no information).

The pool is scored once per seed and the scores given to each ICA run (`ICAController.use_scores`). Reported: the
clean test loss (nats/token) and exact-match accuracy, and the share of the noise gap a method recovers,
(uniform - method) / (uniform - oracle), with per-seed wins against uniform.

    python scripts/bench_label_noise.py --seeds 0 1 2 [--results docs/label_noise_results.json]

Every finished (method, seed) run is kept in the JSON file (written whole) and skipped when run again.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(__file__))
from bench_task_pilot import TASK_CONFIGS, chat, evaluate, top_layer_lora, training_settings  # noqa: E402

from trl_ica.assets import load_model  # noqa: E402
from trl_ica.data_io import write_json  # noqa: E402
from trl_ica.scoring import score_ica  # noqa: E402

warnings.filterwarnings("ignore")
METHODS = ("uniform", "oracle", "ica", "ica_conditioned", "random_weights")


def make_data(args, seed):
    import random

    import reasoning_gym

    config = TASK_CONFIGS.get(args.task, {})
    n = args.n_train + args.n_holdout + args.n_test
    entries = list(reasoning_gym.create_dataset(args.task, size=n, seed=seed, **config))
    train, holdout = entries[: args.n_train], entries[args.n_train : args.n_train + args.n_holdout]
    test = entries[args.n_train + args.n_holdout :]
    other = [str(e["answer"]) for e in reasoning_gym.create_dataset(args.noise_task, size=args.n_train, seed=seed)]
    rng = random.Random(seed)
    noisy = set(rng.sample(range(args.n_train), round(args.noise * args.n_train)))
    rows = [chat(e["question"], other[i] if i in noisy else str(e["answer"])) for i, e in enumerate(train)]
    clean = np.array([i not in noisy for i in range(args.n_train)])
    test = Dataset.from_list([{**chat(e["question"], str(e["answer"])), "entry": json.dumps(e)} for e in test])
    checker = reasoning_gym.create_dataset(args.task, size=1, seed=0, **config)
    holdout = Dataset.from_list([chat(e["question"], str(e["answer"])) for e in holdout])
    return Dataset.from_list(rows), clean, holdout, test, checker


def train(method, rows, holdout, scores, seed, args):
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer

    model, tokenizer = load_model()
    lora = top_layer_lora(model, args.top_layers)
    with tempfile.TemporaryDirectory() as out:
        common = training_settings(out, args, seed)
        if method in ("uniform", "oracle"):
            trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=rows, processing_class=tokenizer,
                                 peft_config=lora)  # fmt: skip
        else:
            form = dict(ica_score_form="conditioned", ica_reduction="mean") if method == "ica_conditioned" else {}
            config = ICASFTConfig(**common, ica_num_demos=3, ica_demo_selection="fixed", ica_seed=seed, **form)
            trainer = ICASFTTrainer(model, args=config, train_dataset=rows, processing_class=tokenizer,
                                    holdout_dataset=holdout, peft_config=lora)  # fmt: skip
            trainer.ica.use_scores(scores[method], f"bench_label_noise {method}")
        trainer.train()
    return trainer.model.eval(), tokenizer


def report(results, methods):
    seeds = sorted({s for m in results.values() for s in m}, key=int)
    both = [s for s in seeds if "uniform" in results and "oracle" in results and s in results["uniform"]
            and s in results["oracle"]]  # fmt: skip
    print(f"\n{len(both)} seeds with uniform and oracle: {both}")
    print("| method | test loss | accuracy | share of the loss gap recovered | seeds better than uniform (loss) |")
    print("|---|---|---|---|---|")
    for method in methods:
        runs = results.get(method, {})
        done = [s for s in both if s in runs]
        if not done:
            continue
        loss = np.array([runs[s]["loss"] for s in done])
        acc = np.array([runs[s]["accuracy"] for s in done])
        uniform = np.array([results["uniform"][s]["loss"] for s in done])
        oracle = np.array([results["oracle"][s]["loss"] for s in done])
        share = (uniform - loss) / (uniform - oracle)
        wins = int((loss < uniform).sum())
        print(f"| {method} | {loss.mean():.3f} ± {loss.std():.3f} | {acc.mean():.3f} ± {acc.std():.3f} | "
              f"{share.mean():+.2f} ± {share.std():.2f} | {wins} of {len(done)} |")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--noise-task", default="family_relationships")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-layers", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-holdout", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = json.load(open(args.results)) if args.results and os.path.isfile(args.results) else {}
    for seed in args.seeds:
        todo = [m for m in args.methods if str(seed) not in results.get(m, {})]
        if not todo:
            continue
        rows, clean, holdout, test, checker = make_data(args, seed)
        scores = {}
        if {"ica", "ica_conditioned"} & set(todo):
            model, tokenizer = load_model()
            ica = score_ica(model, tokenizer, rows, holdout, num_demos=3, demo_selection="fixed", seed=seed,
                            show_progress=False)  # fmt: skip
            scores = {"ica": ica.scores, "ica_conditioned": ica.logp_conditioned / ica.num_tokens}
            from trl_ica.scenarios import auroc

            for name, values in scores.items():
                results.setdefault(f"auroc {name}", {})[str(seed)] = auroc(values, clean)
                print(f"  [seed {seed}] {name}: AUROC clean vs noisy {auroc(values, clean):.3f}", flush=True)
        scores["random_weights"] = np.random.default_rng(seed).random(len(rows))
        for method in todo:
            start = time.perf_counter()
            data = rows.select(np.flatnonzero(clean)) if method == "oracle" else rows
            model, tokenizer = train(method, data, holdout, scores, seed, args)
            loss, accuracy = evaluate(model, tokenizer, test, checker)
            seconds = time.perf_counter() - start
            results.setdefault(method, {})[str(seed)] = dict(loss=loss, accuracy=accuracy, seconds=seconds)
            if args.results:
                write_json(results, args.results)
            print(f"  [seed {seed}] {method}: loss {loss:.4f}, accuracy {accuracy:.3f} ({seconds:.0f} s)", flush=True)
    report(results, args.methods)


if __name__ == "__main__":
    main()
