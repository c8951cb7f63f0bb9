"""Run one experiment file: `python -m benchmarks.run benchmarks/experiments/<suite>/<name>.json`.

An experiment file names its benchmark module (`"benchmark"`), the data and training `"settings"` every run shares,
the `"methods"` and `"seeds"` to run, the `"results"` file they are kept in (per seed, resumable: a finished run is
skipped, a file with other settings refused), and optionally the `"scenarios"` (pools) of a benchmark that has
several, the `"plot"` to draw and the `"labels"` the report gives the methods and scenarios. `--methods` and
`--seeds` run a subset; the table printed at the end covers every kept run.
"""

from __future__ import annotations

import argparse
import importlib
import json

#: The keys an experiment file must have, and those it may have.
REQUIRED = ("benchmark", "settings", "methods", "seeds", "results")
OPTIONAL = ("description", "scenarios", "plot", "labels")


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
    scenarios = getattr(module, "SCENARIOS", None)
    if (scenarios is None) != ("scenarios" not in experiment):
        need = f"needs `scenarios` of {list(scenarios)}" if scenarios else "has no scenarios; remove `scenarios`"
        raise SystemExit(f"{path}: benchmarks.{experiment['benchmark']} {need}.")
    unknown_scenarios = sorted(set(experiment.get("scenarios", ())) - set(scenarios or ()))
    if unknown_scenarios:
        raise SystemExit(
            f"{path}: scenarios {unknown_scenarios} are not scenarios of benchmarks."
            f"{experiment['benchmark']}: {list(scenarios)}."
        )
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


def main(argv=None, description=__doc__, example="benchmarks/experiments/label_noise/shuffled.json"):
    """The runner's command line; a benchmark module's own `main` calls it with its docstring and an example."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help=f"An experiment file, e.g. {example}")
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
