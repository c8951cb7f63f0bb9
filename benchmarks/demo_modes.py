"""kNN demonstration modes that create prefix sharing: does the ranking they give stay that of exact kNN?

For each labelled pool of `benchmarks/layout.py` (SmolLM2-135M-Instruct, k = 3, the default in-turn layout and
closing token), every row is scored with each way of choosing its demonstrations:
- `knn`: the k nearest holdout questions, most similar first (the paper's);
- `knn_grouped`: rows grouped by embedding (ceil(sqrt(N)) groups), each group the k holdout questions nearest its
  centre: one prefix per group;
- `fixed`: one seeded set for every row (the cheapest, and the reference for throughput).

Reported per pool and mode: the AUROC of the paper's score (difference, sum) and of the conditioned form per token,
the distinct demonstration lists, and the tokens the prefix tree runs as a share of the naive computation's.

    python -m benchmarks.run benchmarks/experiments/demo_modes/smollm2.json [--methods ...] [--seeds 0]

The experiment's methods are the modes, its scenarios the pools. Every finished (pool, mode, seed) is kept in the
results file (written whole) and skipped when run again; a file made with other settings is refused.
"""

import warnings

import numpy as np

from benchmarks.common.models import DEFAULT_MODEL, load_model
from benchmarks.common.pools import pool_table, run_pools
from benchmarks.common.results import load as load_results
from benchmarks.layout import SCENARIOS, per_token, pool  # noqa: F401 - its pools are the layout's
from benchmarks.run import main as run_main
from trl_ica.cli.scenarios import auroc
from trl_ica.scoring.ica import prepare_ica, score_with
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import token_counts

warnings.filterwarnings("ignore")
MODES = ("knn", "knn_grouped", "fixed")


METHODS = MODES
SETTINGS = {"model": DEFAULT_MODEL, "num_demos": 3, "layout": "in_turn", "score_end": True}  # and the pool size `n`


def run_experiment(experiment: dict, methods=None, seeds=None, keep_logs="") -> None:
    """An experiment file's scorings (its `methods` and `seeds` unless given), each kept as it finishes; then its
    table."""
    settings = experiment["settings"]
    if set(settings) != {"n", *SETTINGS} or any(settings[k] != v for k, v in SETTINGS.items()):
        raise SystemExit(f"demo_modes settings are the pool size `n` and {SETTINGS}, got {settings}.")
    model, tokenizer = load_model()

    def measure(data, mode, seed):
        train, holdout, positive = data
        builder = prepare_ica(
            model,
            tokenizer,
            train,
            holdout,
            ICAScoringOptions(
                num_demos=3,
                demo_selection=mode,
                seed=seed,
                layout="in_turn",
                form="difference",
                reduction="sum",
                span=None,
            ),
            show_progress=False,
        )
        result = score_with(model, builder, show_progress=False)
        cond, _ = per_token(result)
        requests = [r for i in range(len(builder.candidates)) for c in (True, False) for r in builder.requests(i, c)]
        counts = token_counts(requests)
        return {
            "difference_sum": auroc(result.scores, positive),
            "conditioned_mean": auroc(cond, positive),
            "distinct_lists": len({tuple(d) for d in builder.demo_indices}),
            "tree_share_of_naive": counts.tree / counts.naive,
            "flat_share_of_naive": counts.flat / counts.naive,
        }

    run_pools(
        experiment,
        methods or experiment["methods"],
        seeds or experiment["seeds"],
        lambda name, seed: pool(name, settings["n"], seed),
        measure,
    )
    print("\n".join(report_table(experiment)))


def report_table(experiment: dict) -> list[str]:
    """Per pool and mode, the AUROC of both scores (in brackets: the change against exact kNN on the same pool), the
    distinct demonstration lists and the tokens each engine runs as a share of the naive computation's, averaged
    over the kept seeds."""
    results = load_results(experiment["results"])

    def mean(runs, key):
        return float(np.mean([r[key] for r in runs.values()]))

    def cells(runs, name):
        knn = results.get(f"{name} knn")
        out = []
        for key in ("difference_sum", "conditioned_mean"):
            change = "" if not knn or runs is knn else f" ({mean(runs, key) - mean(knn, key):+.3f})"
            out.append(f"{mean(runs, key):.3f}{change}")
        keys = ("distinct_lists", "tree_share_of_naive", "flat_share_of_naive")
        return out + [f"{mean(runs, keys[0]):.0f}"] + [f"{mean(runs, k):.3f}" for k in keys[1:]]

    header = [
        "demonstrations",
        "AUROC, difference, sum (paper)",
        "AUROC, conditioned, per token",
        "distinct lists",
        "tree tokens / naive",
        "flat tokens / naive",
    ]
    lines = pool_table(experiment, header, cells)
    return lines + ["", "(in brackets: the change against exact kNN.)"]


def main(argv=None):
    run_main(argv, __doc__, "benchmarks/experiments/demo_modes/smollm2.json")


if __name__ == "__main__":
    main()
