"""Every script in `scripts/` and every benchmark module in `benchmarks/` starts: `--help` imports it and everything
it imports and parses its arguments, so a function removed from one module cannot leave a benchmark that no longer
runs. Every experiment file is valid against its results file, and docs/benchmarks.md holds the tables the kept
results give."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))
BENCHMARKS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) if not p.endswith("__.py")
)
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "experiments", "*", "*.json")))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


def test_everything_is_listed():
    assert len(SCRIPTS) >= 5 and len(BENCHMARKS) >= 15 and "label_noise" in BENCHMARKS and "report" in BENCHMARKS
    assert len(EXPERIMENTS) >= 3


def test_benchmarks_import_each_other_as_a_package():
    """No `sys.path` chains and nothing from tests/: a benchmark imports `benchmarks.common` or another benchmark."""
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.py"), recursive=True):
        source = open(path).read()
        assert "sys.path" not in source and "from reference import" not in source, path


@pytest.mark.multiprocess
@pytest.mark.slow  # about 6 s a script (importing torch and transformers): run once, on the lowest versions
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "usage" in done.stdout.lower()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_starts(name):
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "usage" in done.stdout.lower()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_experiment_files_match_their_results(path, monkeypatch):
    """Each experiment loads (known keys and methods) and its results file was made with its settings; one that has
    not run yet keeps no file, and its docs block says so."""
    import json

    from benchmarks.run import benchmark_module, load_experiment

    monkeypatch.chdir(ROOT)
    experiment = load_experiment(path)
    results = os.path.join(ROOT, experiment["results"])
    if not os.path.isfile(results):
        table = "\n".join(benchmark_module(experiment, path).report_table(experiment))
        assert "runs kept: none" in table, table
        return
    assert json.load(open(results))["settings"] == experiment["settings"]


def test_experiment_files_are_checked(tmp_path):
    from benchmarks.run import load_experiment

    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"benchmark": "label_noise", "settings": {}, "methods": ["uniform", "nope"], "seeds": [0], '
        '"results": "x.json"}'
    )
    with pytest.raises(SystemExit, match=r"methods \['nope'\]"):
        load_experiment(str(bad))
    bad.write_text('{"benchmark": "label_noise", "settings": {}, "methods": [], "seeds": [0], "result": "x.json"}')
    with pytest.raises(SystemExit, match=r"missing keys \['results'\], unknown keys \['result'\]"):
        load_experiment(str(bad))
    bad.write_text(
        '{"benchmark": "layout", "settings": {}, "methods": ["turns/end"], "seeds": [0], '
        '"results": "x.json", "scenarios": ["gsm8k", "nope"]}'
    )
    with pytest.raises(SystemExit, match=r"scenarios \['nope'\] are not scenarios of benchmarks.layout"):
        load_experiment(str(bad))
    bad.write_text(
        '{"benchmark": "label_noise", "settings": {}, "methods": [], "seeds": [0], "results": "x.json", '
        '"scenarios": ["gsm8k"]}'
    )
    with pytest.raises(SystemExit, match="has no scenarios"):
        load_experiment(str(bad))


def test_docs_hold_the_tables_of_the_kept_results(monkeypatch):
    from benchmarks import report

    assert report.main(["--check"]) == 0, "run `python -m benchmarks.report`"


def test_pool_benchmarks_resume_and_refuse_other_settings(tmp_path, capsys):
    """The pooled loop measures only what its results file lacks, keeps each record as it finishes, and refuses a
    file made with other settings; its table names pools once and methods by their labels."""
    from benchmarks.common.pools import pool_table, run_pools

    experiment = {
        "settings": {"n": 4},
        "scenarios": ["a", "b"],
        "methods": ["x", "y"],
        "labels": {"a": "pool A"},
        "results": str(tmp_path / "r.json"),
    }
    built, measured = [], []

    def make_pool(name, seed):
        built.append((name, seed))
        return name

    def measure(pool, method, seed):
        measured.append((pool, method, seed))
        return {"auroc": 0.5 + seed / 10, "seconds": 1.0}

    run_pools(experiment, ["x"], [0], make_pool, measure)
    run_pools(experiment, ["x", "y"], [0, 1], make_pool, measure)
    assert measured == [
        ("a", "x", 0),
        ("b", "x", 0),
        ("a", "y", 0),
        ("b", "y", 0),
        ("a", "x", 1),
        ("a", "y", 1),
        ("b", "x", 1),
        ("b", "y", 1),
    ]
    assert len(built) == 6  # once per pool and seed with work left
    kept = json.load(open(experiment["results"]))
    assert kept["settings"] == {"n": 4} and kept["a y"] == {
        "0": {"auroc": 0.5, "seconds": 1.0},
        "1": {"auroc": 0.6, "seconds": 1.0},
    }
    lines = pool_table(experiment, ["method", "AUROC"], lambda runs, pool: [f"{len(runs)} runs"])
    assert lines[2:] == [
        "| pool A | x | 2 runs | 2 |",
        "|  | y | 2 runs | 2 |",
        "| b | x | 2 runs | 2 |",
        "|  | y | 2 runs | 2 |",
    ]
    with pytest.raises(SystemExit, match="other settings"):
        run_pools({**experiment, "settings": {"n": 5}}, ["x"], [0], make_pool, measure)


def test_label_noise_keeps_gsm8k_to_its_own_noise():
    """GSM8K's corruptions come from its own generator: mixing it with reasoning-gym's noise kinds is refused."""
    from benchmarks.label_noise import SETTING_KEYS, run

    base = dict.fromkeys(SETTING_KEYS, 0)
    for task, kind, other in (
        ("gsm8k", "shuffled", ""),
        ("basic_arithmetic", "corrupted", ""),
        ("gsm8k", "corrupted", "family_relationships"),
    ):
        settings = {**base, "task": task, "noise_kind": kind, "noise_task": other}
        with pytest.raises(SystemExit, match=f"task={task!r}, noise_kind={kind!r}, noise_task={other!r}"):
            run(settings, [], [])
