"""Benchmarks that measure each method once per labelled pool and seed (no training): the resumable loop over
(seed, pool, method) and the table with a row per pool and method. Results are kept as
`{"<pool> <method>": {seed: record}}` beside the `"settings"`."""

from __future__ import annotations

import time

from benchmarks.common.results import check_settings, load, save


def run_pools(experiment: dict, methods, seeds, make_pool, measure) -> dict:
    """Every (pool, method, seed) of `experiment` not yet in its results file, each written there as it finishes.

    Args:
        experiment (`dict`): an experiment file's contents (`settings`, `scenarios`, `results`).
        methods, seeds: those to run.
        make_pool (`callable`): `(pool name, seed) -> pool`, built once per pool and seed that has work left.
        measure (`callable`): `(pool, method, seed) -> record` (a dict of numbers); its wall time is added as
            `seconds` unless it gives one.
    """
    path = experiment["results"]
    results = load(path)
    check_settings(results, dict(experiment["settings"]), path)
    for seed in seeds:
        for name in experiment["scenarios"]:
            todo = [m for m in methods if str(seed) not in results.get(f"{name} {m}", {})]
            if not todo:
                continue
            pool = make_pool(name, seed)
            for method in todo:
                start = time.perf_counter()
                record = measure(pool, method, seed)
                record.setdefault("seconds", time.perf_counter() - start)
                results.setdefault(f"{name} {method}", {})[str(seed)] = record
                save(results, path)
                print(
                    f"  [seed {seed}] {name} {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items()),
                    flush=True,
                )
    return results


def pool_table(experiment: dict, header, cells) -> list[str]:
    """A markdown table of the experiment's kept results with a row per (pool, method), in its order and named by
    its `labels`, the pool on its first row only; `cells(runs, pool)` gives a row's cells after the method (`runs`:
    `{seed: record}`), `header` names the method column and those."""
    results, labels = load(experiment["results"]), experiment.get("labels", {})
    lines = ["| pool | " + " | ".join(header) + " | seeds |", "|---|" + "---|" * (len(header) + 1)]
    for name in experiment["scenarios"]:
        first = True
        for method in experiment["methods"]:
            runs = results.get(f"{name} {method}", {})
            if not runs:
                continue
            pool_label = labels.get(name, name) if first else ""
            first = False
            lines.append(
                f"| {pool_label} | {labels.get(method, method)} | "
                + " | ".join(cells(runs, name))
                + f" | {len(runs)} |"
            )
    return lines
