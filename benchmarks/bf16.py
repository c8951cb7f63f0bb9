"""ICA scores of SmolLM2-135M-Instruct in bf16 against float32, on the noisy GSM8K pool (40 % wrong, mismatched or
truncated answers) with k = 3 nearest holdout demonstrations.

Three precisions score the same rows: float32 weights (the reference), bf16 weights, and float32 weights under bf16
autocast (what mixed-precision training runs, and what the ICA trainers now score with). For each, and for two
score settings (the recipes' conditioned form per token, and the paper's summed difference), the script reports
Spearman's rank correlation with the float32 scores, the largest score gap, the AUROC of clean against corrupted
rows, and the wall time.

    python -m benchmarks.bf16 [--n 96] [--results benchmarks/results/bf16.json]

Each (setting, precision) result is kept in the JSON file (written whole) and skipped when run again; the file
records its settings and refuses a run with other ones.
"""

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from trl_ica.cli.scenarios import auroc, noisy_gsm8k
from trl_ica.embedded import load_model
from trl_ica.scoring.ica import prepare_ica, score_with
from trl_ica.scoring.options import ICAScoringOptions

warnings.filterwarnings("ignore")
SETTINGS = {"conditioned_mean": ("conditioned", "mean"), "difference_sum": ("difference", "sum")}
PRECISIONS = ("float32", "bf16_weights", "bf16_autocast")


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--n-holdout", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="benchmarks/results/bf16.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"n": args.n, "n_holdout": args.n_holdout, "threads": args.threads, "num_demos": 3}
    results = load_results(args.results)
    check_settings(results, settings, args.results)  # refuses a file of runs with other settings
    results.setdefault("runs", {})
    train, holdout, _ = noisy_gsm8k(args.n, args.n_holdout, 8, seed=0)
    clean = np.array([c == "clean" for c in train["corruption"]])
    model, tokenizer = load_model()
    rows = train.remove_columns("corruption")
    for name, (form, reduction) in SETTINGS.items():
        options = ICAScoringOptions(num_demos=3, form=form, reduction=reduction, span=None)
        builder = prepare_ica(model, tokenizer, rows, holdout, options, show_progress=False)
        for precision in PRECISIONS:
            key = f"{name}/{precision}"
            if key in results["runs"]:
                continue
            scorer = load_model()[0]  # fresh float32 weights: a bf16 round trip would round them
            if precision == "bf16_weights":
                scorer = scorer.to(torch.bfloat16)
            compute = torch.bfloat16 if precision == "bf16_autocast" else None
            start = time.perf_counter()
            scores = score_with(scorer, builder, show_progress=False, compute_dtype=compute).scores
            results["runs"][key] = {
                "seconds": time.perf_counter() - start,
                "scores": scores.tolist(),
                "auroc": auroc(scores, clean),
            }
            save_results(results, args.results)
            print(key, f"{results['runs'][key]['seconds']:.1f} s", f"AUROC {results['runs'][key]['auroc']:.3f}")
    print("\n".join(results_table(results)))


#: How the table names the scores and precisions.
LABELS = {
    "conditioned_mean": "conditioned, per-token mean (the recipes')",
    "difference_sum": "difference, summed (the paper's)",
    "float32": "float32",
    "bf16_weights": "bf16 weights",
    "bf16_autocast": "bf16 autocast",
}


def results_table(results: dict) -> list[str]:
    """Per score and precision: the rank agreement with float32's scores, the largest score gap, the AUROC and the
    time (for `python -m benchmarks.report`)."""
    lines = [
        "| score | precision | Spearman vs float32 | largest score gap | AUROC clean vs corrupted | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        reference = np.array(results["runs"][f"{name}/float32"]["scores"])
        for precision in PRECISIONS:
            run = results["runs"][f"{name}/{precision}"]
            scores = np.array(run["scores"])
            first = LABELS[name] if precision == PRECISIONS[0] else ""
            gap = np.abs(scores - reference).max()
            lines.append(
                f"| {first} | {LABELS[precision]} | {spearman(scores, reference):.4f} | {gap:.3f} | "
                f"{run['auroc']:.3f} | {run['seconds']:.0f} |"
            )
    return lines


if __name__ == "__main__":
    main()
