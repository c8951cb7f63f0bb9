"""Run one experiment file: `python -m benchmarks.run benchmarks/experiments/<suite>/<name>.json`.

An experiment file names its benchmark module (`"benchmark"`), the data and training `"settings"` every run shares,
the `"methods"` and `"seeds"` to run, the `"results"` file they are kept in (per seed, resumable: a finished run is
skipped, a file with other settings refused), and optionally the `"plot"` to draw and the `"labels"` the report
gives the methods. `--methods` and `--seeds` run a subset; the table printed at the end covers every kept run.
"""

from __future__ import annotations

import argparse
import importlib
import json

#: The keys an experiment file must have, and those it may have.
REQUIRED = ("benchmark", "settings", "methods", "seeds", "results")
OPTIONAL = ("description", "plot", "labels")


def load_experiment(path: str) -> dict:
    """The experiment in `path`, checked: its keys, and a benchmark module that runs experiments."""
    with open(path) as f:
        experiment = json.load(f)
    missing = [k for k in REQUIRED if k not in experiment]
    unknown = sorted(set(experiment) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise SystemExit(f"{path}: missing keys {missing}, unknown keys {unknown}; allowed: {[*REQUIRED, *OPTIONAL]}.")
    module = benchmark_module(experiment, path)
    unknown_methods = sorted(set(experiment["methods"]) - set(module.METHODS))
    if unknown_methods:
        raise SystemExit(f"{path}: methods {unknown_methods} are not methods of benchmarks.{experiment['benchmark']}.")
    return experiment


def benchmark_module(experiment: dict, path: str = "the experiment"):
    name = experiment["benchmark"]
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError:
        raise SystemExit(f"{path}: no benchmark module benchmarks.{name}.") from None
    if not hasattr(module, "run_experiment"):
        raise SystemExit(f"{path}: benchmarks.{name} does not run experiment files (no `run_experiment`).")
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="An experiment file, e.g. benchmarks/experiments/label_noise/shuffled.json")
    parser.add_argument("--methods", nargs="+", help="Run these of the experiment's methods only.")
    parser.add_argument("--seeds", nargs="+", type=int, help="Run these seeds instead of the experiment's.")
    parser.add_argument("--keep-logs", default="", help="Folder for each weighted run's ica/ logs and traces.")
    args = parser.parse_args(argv)
    experiment = load_experiment(args.experiment)
    extra = sorted(set(args.methods or ()) - set(experiment["methods"]))
    if extra:
        raise SystemExit(f"--methods {extra} are not in {args.experiment}; add them to its `methods` first.")
    module = benchmark_module(experiment, args.experiment)
    module.run_experiment(experiment, args.methods, args.seeds, args.keep_logs)


if __name__ == "__main__":
    main()
