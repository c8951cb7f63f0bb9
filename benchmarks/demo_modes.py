"""kNN demonstration modes that create prefix sharing: does the ranking they give stay that of exact kNN?

For each labelled pool of `benchmarks/layout.py` (SmolLM2-135M-Instruct, k = 3, the default in-turn layout and
closing token), every row is scored with each way of choosing its demonstrations:
- `knn`: the k nearest holdout questions, most similar first (the paper's);
- `knn_canonical`: the same k in one order shared by every row (the holdout rows most often among the nearest
  first), so rows with overlapping neighbours share the start of their prefix;
- `knn_grouped`: rows grouped by embedding (ceil(sqrt(N)) groups), each group the k holdout questions nearest its
  centre: one prefix per group;
- `fixed`: one seeded set for every row (the cheapest, and the reference for throughput).

Reported per pool and mode: the AUROC of the paper's score (difference, sum) and of the conditioned form per token,
the distinct demonstration lists, and the tokens the prefix tree runs as a share of the naive computation's.

    python -m benchmarks.demo_modes [--scenarios ...] [--seeds 0] [--results benchmarks/results/demo_modes.json]

Every finished (scenario, mode, seed) is kept in the JSON file (written whole) and skipped when run again; the file
records the pool size and the model, and a run with others is refused.
"""

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch

from benchmarks.layout import SCENARIOS, per_token, pool
from trl_ica.cli.assets import DEFAULT_MODEL, load_model
from trl_ica.cli.scenarios import auroc
from trl_ica.data_io import write_json
from trl_ica.scoring.ica import prepare_ica, score_with
from trl_ica.scoring.planner import token_counts

warnings.filterwarnings("ignore")
MODES = ("knn", "knn_canonical", "knn_grouped", "fixed")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--n", type=int, default=160, help="pool rows (pairs: half of it)")
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = json.load(open(args.results)) if args.results and os.path.isfile(args.results) else {}
    settings = {"n": args.n, "model": DEFAULT_MODEL, "num_demos": 3, "layout": "in_turn", "score_end": True}
    if results.setdefault("settings", settings) != settings:
        raise SystemExit(f"{args.results} holds runs with other settings ({results['settings']}, asked {settings}).")
    model, tokenizer = load_model()
    for seed in args.seeds:
        for name in args.scenarios:
            todo = [m for m in args.modes if str(seed) not in results.get(f"{name} {m}", {})]
            if not todo:
                continue
            train, holdout, positive = pool(name, args.n // 2 if name == "pairs" else args.n, seed)
            for mode in todo:
                start = time.perf_counter()
                builder = prepare_ica(model, tokenizer, train, holdout, num_demos=3, demo_selection=mode, seed=seed,
                                      layout="in_turn", show_progress=False)  # fmt: skip
                result = score_with(model, builder, show_progress=False)
                cond, plain = per_token(result)
                requests = [
                    r for i in range(len(builder.candidates)) for c in (True, False) for r in builder.requests(i, c)
                ]
                counts = token_counts(requests)
                record = {
                    "difference_sum": auroc(result.scores, positive),
                    "conditioned_mean": auroc(cond, positive),
                    "distinct_lists": len({tuple(d) for d in builder.demo_indices}),
                    "tree_share_of_naive": counts.tree / counts.naive,
                    "flat_share_of_naive": counts.flat / counts.naive,
                    "seconds": time.perf_counter() - start,
                }
                results.setdefault(f"{name} {mode}", {})[str(seed)] = record
                if args.results:
                    write_json(results, args.results)
                print(f"  [seed {seed}] {name} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items()),
                      flush=True)  # fmt: skip
    report(results, args.scenarios, args.modes)


def report(results, scenarios, modes):
    header = (
        "| pool | mode | AUROC difference, sum | AUROC conditioned, per token | distinct lists | tree / naive tokens"
    )
    print(f"\n{header} | seeds |")
    print("|---|---|---|---|---|---|---|")
    for name in scenarios:
        for mode in modes:
            runs = results.get(f"{name} {mode}", {})
            if not runs:
                continue
            keys = ("difference_sum", "conditioned_mean", "distinct_lists", "tree_share_of_naive")
            cells = [np.mean([r[k] for r in runs.values()]) for k in keys]
            print(f"| {name} | {mode} | {cells[0]:.3f} | {cells[1]:.3f} | {cells[2]:.0f} | {cells[3]:.2f} "
                  f"| {len(runs)} |")  # fmt: skip


if __name__ == "__main__":
    main()
