"""Rebuild the tables of docs/benchmarks.md from the kept results: `python -m benchmarks.report [--check]`.

Each experiment file under benchmarks/experiments/ has a block in docs/benchmarks.md between
`<!-- report: <suite>/<name> -->` and `<!-- /report -->`; its contents are the experiment's table, rebuilt from its
results file. The timing benchmarks that keep a results file (`RESULT_TABLES`) have a block
`<!-- report: timing/<module> -->`, rebuilt by the module's `results_table` (or, for a module with several tables,
`<!-- report: timing/<module>/<table> -->` by its `results_tables`). README.md's "What to use for which data"
table is the block `<!-- report: readme/what_to_use -->` (docs/scores.md shows it too), and the SFT default's goal,
checked per pool, the block `<!-- report: defaults/goal -->` of docs/benchmarks.md, both rebuilt by
`benchmarks.what_to_use`. Tables that put methods of several experiments side by side are the blocks
`<!-- report: view/<name> -->`, rebuilt by `benchmarks.views` (the ranking of every score, `view/auroc`, is in
docs/scores.md). `--check` changes nothing and exits 1 when a block is out of date or missing.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import sys

from benchmarks.run import benchmark_module, load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "benchmarks", "experiments")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
README = os.path.join(ROOT, "README.md")
SCORES = os.path.join(ROOT, "docs", "scores.md")


#: The kept results of the benchmarks that take flags, by module: their tables are rebuilt by
#: `benchmarks.<module>.results_table` from the file's contents (a folder's path is passed as is).
RESULT_TABLES = {
    "bf16": "benchmarks/results/bf16.json",
    "demo": "benchmarks/results/demo.json",
    "memory": "benchmarks/results/memory.json",
    "online": "benchmarks/results/online.json",
    "packing": "benchmarks/results/packing.json",
    "precision": "benchmarks/results/precision.json",
    "preference": "benchmarks/results/preference.json",
    "sampling": "benchmarks/results/sampling.json",
    "scoring": "benchmarks/results/scoring.json",
    "sharing": "benchmarks/results/sharing.json",
    "scorer_cost": "benchmarks/results/scorer_cost.json",
    "scorer_agreement": "benchmarks/results/scorer_agreement",
    "whisperer": "benchmarks/results/whisperer.json",
}


def experiments() -> dict[str, str]:
    """`{"<suite>/<name>": path}` of every experiment file."""
    paths = sorted(glob.glob(os.path.join(EXPERIMENTS, "*", "*.json")))
    return {os.path.relpath(p, EXPERIMENTS)[: -len(".json")]: p for p in paths}


def tables() -> dict[str, list[str]]:
    """`{block key: the table's lines}` of every experiment and every timing benchmark's kept results."""
    out = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # results paths are relative to the repository root
    try:
        for key, path in experiments().items():
            experiment = load_experiment(path)
            out[key] = benchmark_module(experiment, path).report_table(experiment)
        from benchmarks import views, what_to_use

        out["defaults/goal"] = what_to_use.goal_table()
        out.update(views.tables())
        for name, path in RESULT_TABLES.items():
            module = importlib.import_module(f"benchmarks.{name}")
            if os.path.isdir(path):
                out[f"timing/{name}"] = module.results_table(path)
                continue
            with open(path) as f:
                results = json.load(f)
            if hasattr(module, "results_tables"):  # several tables: `timing/<module>/<table>`
                out.update({f"timing/{name}/{key}": lines for key, lines in module.results_tables(results).items()})
            else:
                out[f"timing/{name}"] = module.results_table(results)
    finally:
        os.chdir(cwd)
    return out


def readme_tables() -> dict[str, list[str]]:
    """`{block key: the table's lines}` of README.md."""
    from benchmarks import what_to_use

    return {"readme/what_to_use": what_to_use.results_table()}


def scores_tables() -> dict[str, list[str]]:
    """`{block key: the table's lines}` of docs/scores.md: README.md's, and the ranking of every score."""
    from benchmarks import views

    return {**readme_tables(), views.AUROC_VIEW: views.auroc_table()}


def rebuilt(text: str, blocks: dict[str, list[str]]) -> tuple[str, list[str]]:
    """`text` with every one of `blocks` rebuilt, and the keys that have no block in it."""
    missing = []
    for key, lines in blocks.items():
        block = f"<!-- report: {key} -->\n" + "\n".join(lines) + "\n<!-- /report -->"
        pattern = re.compile(rf"<!-- report: {re.escape(key)} -->\n.*?<!-- /report -->", re.S)
        if not pattern.search(text):
            missing.append(key)
            continue
        text = pattern.sub(lambda _, block=block: block, text)
    return text, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Exit 1 if docs/benchmarks.md is out of date.")
    args = parser.parse_args(argv)
    stale = []
    for path, blocks in ((DOC, tables()), (README, readme_tables()), (SCORES, scores_tables())):
        name = os.path.relpath(path, ROOT)
        with open(path) as f:
            text = f.read()
        new, missing = rebuilt(text, blocks)
        if missing:
            print(
                f"{name} has no report block for {missing}: add `<!-- report: KEY -->` ... "
                "`<!-- /report -->` where each table belongs.",
                file=sys.stderr,
            )
            return 1
        if new == text:
            continue
        if args.check:
            stale.append(name)
            continue
        from trl_ica.data_io import written_whole

        with written_whole(path) as temporary, open(temporary, "w") as f:
            f.write(new)
    if stale:
        print(f"{', '.join(stale)} out of date: run `python -m benchmarks.report`.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
