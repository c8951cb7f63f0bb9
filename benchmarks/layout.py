"""How the conditioned request is laid out, and which tokens are scored: AUROC of each choice on labelled pools.

The same rows are scored in three layouts and with or without the token that closes each response:
- `in_turn`: conversational rows, the demonstrations and the question in one user turn with the paper's wording
  (`ica_demo_layout="in_turn"`, the default);
- `turns`: conversational rows, each demonstration an earlier user/assistant exchange before the row's unchanged
  turn (`ica_demo_layout="turns"`): the requests with and without demonstrations differ by the demonstrations alone;
- `standard`: the same rows as standard prompt/completion text (`"{question}\\nAnswer: "`), plain few-shot demos;
- `end` / `no_end`: `ica_score_end_token` True / False (the chat template's end of turn, or EOS).

For each, the AUROC (larger score = the rows that matter) of the paper's score (difference, sum), the difference
per token and the conditioned form per token. Pools (SmolLM2-135M-Instruct, k = 3 kNN demonstrations):
- `label_noise`: the label-noise benchmark's pool, one-digit arithmetic with half the answers taken from
  family_relationships (clean vs noisy);
- `label_noise_shuffled`: the same with half the answers those of other arithmetic questions;
- `mixture`: a reasoning-gym task mixture, target task (leg counting) vs the rest;
- `gsm8k`: noisy GSM8K, clean vs corrupted (wrong final number, another problem's solution, truncated);
- `pairs`: GSM8K preference pairs, correct vs flipped.

    python -m benchmarks.layout [--scenarios ...] [--seeds 0] [--results benchmarks/results/layout.json]

Every finished (scenario, variant, seed) is kept in the JSON file (written whole) and skipped when run again; the
file records the pool sizes and the model, and a run with others is refused.
"""

import argparse
import json
import os
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from datasets import Dataset

from benchmarks.common.data import reasoning_gym_mixture
from benchmarks.label_noise import make_data
from trl_ica.cli.assets import DEFAULT_MODEL, load_model
from trl_ica.cli.scenarios import auroc, noisy_gsm8k, noisy_gsm8k_pairs
from trl_ica.data_io import write_json
from trl_ica.scoring.ica import score_ica

warnings.filterwarnings("ignore")
SCENARIOS = ("label_noise", "label_noise_shuffled", "mixture", "gsm8k", "pairs")
VARIANTS = tuple(f"{layout}/{end}" for layout in ("in_turn", "turns", "standard") for end in ("end", "no_end"))


def pool(name, n, seed):
    """(train, holdout, positive): rows, a clean holdout, and which rows are the ones that matter."""
    if name.startswith("label_noise"):
        kind = "shuffled" if name.endswith("shuffled") else "other_task"
        args = SimpleNamespace(task="basic_arithmetic", noise_task="family_relationships", noise=0.5, noise_kind=kind,
                               n_train=n, n_holdout=32, n_test=0)  # fmt: skip
        train, clean, holdout, _, _ = make_data(args, seed)
        return train, holdout, clean
    if name == "mixture":
        train, holdout, _ = reasoning_gym_mixture(n_per_task=n // 5, n_holdout=16, n_test=0, seed=seed)
        return train.remove_columns("task"), holdout, np.array(train["task"]) == "leg_counting"
    if name == "gsm8k":
        train, holdout, _ = noisy_gsm8k(n_train=n, n_holdout=16, n_test=0, noise=0.5, seed=seed)
        return train.remove_columns("corruption"), holdout, np.array(train["corruption"]) == "clean"
    train, holdout, _ = noisy_gsm8k_pairs(n_train=n, n_holdout=16, n_test=0, flip=0.5, seed=seed)
    return train.remove_columns("flipped"), holdout, ~np.array(train["flipped"])


def as_standard(dataset: Dataset) -> Dataset:
    """Conversational prompt/completion or preference rows as standard text rows."""

    def convert(row):
        out = {"prompt": f"{row['prompt'][-1]['content']}\nAnswer: "}
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                out[key] = row[key][-1]["content"]
        return out

    return dataset.map(convert, remove_columns=dataset.column_names)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--n", type=int, default=160, help="pool rows (pairs: half of it)")
    parser.add_argument("--demo-selection", default="knn", choices=["knn", "fixed", "random"])
    parser.add_argument("--model", default=None, help="model to score with (default: the embedded SmolLM2)")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = json.load(open(args.results)) if args.results and os.path.isfile(args.results) else {}
    settings = {"n": args.n, "demo_selection": args.demo_selection, "model": args.model or DEFAULT_MODEL}
    if results.setdefault("settings", settings) != settings:
        raise SystemExit(f"{args.results} holds runs with other settings ({results['settings']}, asked {settings}).")
    model, tokenizer = load_model(args.model or DEFAULT_MODEL)
    for seed in args.seeds:
        for name in args.scenarios:
            todo = [v for v in args.variants if str(seed) not in results.get(f"{name} {v}", {})]
            if not todo:
                continue
            train, holdout, positive = pool(name, args.n // 2 if name == "pairs" else args.n, seed)
            for variant in todo:
                layout, end = variant.split("/")
                data = (as_standard(train), as_standard(holdout)) if layout == "standard" else (train, holdout)
                start = time.perf_counter()
                result = score_ica(model, tokenizer, *data, num_demos=3, demo_selection=args.demo_selection,
                                   layout="in_turn" if layout == "standard" else layout, score_end=end == "end",
                                   seed=seed, show_progress=False)  # fmt: skip
                cond, plain = per_token(result)
                record = {
                    "difference_sum": auroc(result.scores, positive),
                    "difference_mean": auroc(cond - plain, positive),
                    "conditioned_mean": auroc(cond, positive),
                    "seconds": time.perf_counter() - start,
                }
                results.setdefault(f"{name} {variant}", {})[str(seed)] = record
                if args.results:
                    write_json(results, args.results)
                print(f"  [seed {seed}] {name} {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items()),
                      flush=True)  # fmt: skip
    report(results, args.scenarios, args.variants)


def per_token(result):
    """log p(y | D, x) and log p(y | x) per response token; for pairs, chosen-minus-rejected margins of them."""
    if result.pair_logps is None:
        return result.logp_conditioned / result.num_tokens, result.logp_unconditioned / result.num_tokens
    logps, tokens = result.pair_logps, result.pair_tokens
    return tuple(logps[:, a] / tokens[:, 0] - logps[:, a + 1] / tokens[:, 1] for a in (0, 2))


def report(results, scenarios, variants):
    print("\n| pool | layout / closing token | difference, sum (paper) | difference, per token | conditioned, per "
          "token | seeds |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in scenarios:
        for variant in variants:
            runs = results.get(f"{name} {variant}", {})
            if not runs:
                continue
            cells = [np.mean([r[k] for r in runs.values()]) for k in ("difference_sum", "difference_mean",
                                                                       "conditioned_mean")]  # fmt: skip
            print(f"| {name} | {variant} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {len(runs)} |")


if __name__ == "__main__":
    main()
