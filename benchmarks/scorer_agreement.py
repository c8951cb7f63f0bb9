"""Do a small and a larger scorer agree? The recommended SFT score (conditioned form per token, k = 3 fixed
demonstrations as earlier turns) of one label-noise pool under SmolLM2-135M-Instruct and under
Qwen2.5-Coder-0.5B-Instruct, per seed: the AUROC of each (clean rows over noisy ones), their rank correlation
(Spearman), and how much the top halves they would select overlap and how clean each is.

This is the ranking half of the question whether a small scorer can serve a larger trained model; the other half,
training the 0.5B model with each scorer's weights, is a training benchmark of its own. Both scores are read from
the experiment's own results file where they are kept (else computed); the 0.5B model's are kept in `--results`
too.

    python -m benchmarks.scorer_agreement benchmarks/experiments/label_noise/other_task.json [--seeds 0 1 2 3 4]
        [--results benchmarks/results/scorer_agreement/other_task.json]
"""

import argparse
import os

import numpy as np
import torch

from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from benchmarks.label_noise import make_data, pool_scores
from benchmarks.run import load_experiment
from trl_ica.cli.scenarios import auroc
from trl_ica.selection.baselines import select_top

SMALL, LARGE = "turns_conditioned", "qwen_turns_conditioned"


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 (ties, which float scores almost never have, broken by position)."""
    return np.argsort(np.argsort(values, kind="stable"), kind="stable")


def agreement(small: np.ndarray, large: np.ndarray, clean: np.ndarray) -> dict:
    top_small, top_large = (set(select_top(s, 0.5).tolist()) for s in (small, large))
    return {
        "auroc_small": auroc(small, clean),
        "auroc_large": auroc(large, clean),
        "spearman": float(np.corrcoef(ranks(small), ranks(large))[0, 1]),
        "top_half_overlap": len(top_small & top_large) / len(top_small),
        "clean_share_small": float(clean[sorted(top_small)].mean()),
        "clean_share_large": float(clean[sorted(top_large)].mean()),
    }


#: The pools measured, by their results file's name, as the table names them.
POOLS = {"other_task": "answers of another task (wrong kind)", "shuffled": "answers of other sums (right kind)"}


def table(files: dict) -> list[str]:
    """Per pool (`{results file's name: its results}`): both scorers' AUROC, their rank correlation, the share of
    the top halves they share and how clean each top half is, mean ± sd over the seeds."""
    lines = [
        "| pool | AUROC, SmolLM2-135M | AUROC, Qwen2.5-Coder-0.5B | Spearman between the two | top halves shared | "
        "clean share of the top half, 135M / 0.5B | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, results in files.items():
        rows = [results["seeds"][s] for s in sorted(results.get("seeds", {}), key=int)]
        if not rows:
            continue

        def stat(key, rows=rows, spread=True):
            values = np.array([r[key] for r in rows])
            return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if spread else "")

        shares = f"{stat('clean_share_small', spread=False)} / {stat('clean_share_large', spread=False)}"
        lines.append(
            f"| {POOLS.get(name, name)} | {stat('auroc_small')} | {stat('auroc_large')} | {stat('spearman')} "
            f"| {stat('top_half_overlap')} | {shares} | {len(rows)} |"
        )
    return lines


def results_table(folder: str) -> list[str]:
    """The table of every results file in `folder` (for `python -m benchmarks.report`)."""
    import glob

    paths = sorted(glob.glob(os.path.join(folder, "*.json")))
    return table({os.path.basename(p)[: -len(".json")]: load_results(p) for p in paths})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a label_noise experiment file (its pool, holdout and seeds)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    experiment = load_experiment(args.experiment)
    settings = argparse.Namespace(**experiment["settings"])
    kept_small = load_results(experiment["results"])  # read only: the experiment's own file is not written here
    results = load_results(args.results)
    check_settings(results, experiment["settings"], args.results)
    for seed in args.seeds or experiment["seeds"]:
        if str(seed) in results.get("seeds", {}):
            continue
        rows, kinds, holdout, _, _ = make_data(settings, seed)
        clean = kinds == "clean"
        kept_large = kept_small.get("scores", {}).get(LARGE, {})  # the experiment's own runs may have them
        if str(seed) in kept_large:
            results.setdefault("scores", {}).setdefault(LARGE, {})[str(seed)] = kept_large[str(seed)]
        small = pool_scores(kept_small, {SMALL}, rows, holdout, clean, seed)[SMALL]
        large = pool_scores(results, {LARGE}, rows, holdout, clean, seed)[LARGE]
        results.setdefault("seeds", {})[str(seed)] = agreement(small, large, clean)
        save_results(results, args.results)
        print(f"  [seed {seed}] {results['seeds'][str(seed)]}", flush=True)
    print("\n".join(table({os.path.basename(args.results)[: -len(".json")]: results})))


if __name__ == "__main__":
    main()
