"""trl_ica's benchmarks. Run from the repository root, each as a module: `python -m benchmarks.<name> --help`, or an
experiment file through the runner: `python -m benchmarks.run benchmarks/experiments/<suite>/<name>.json`.
See benchmarks/README.md."""
