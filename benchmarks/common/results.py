"""Resumable results: a JSON file per benchmark, written whole after every finished run, refused when it holds runs
made with other settings."""

from __future__ import annotations

import json
import os

from trl_ica.data_io import write_json


def load(path: str | None) -> dict:
    """The results kept in `path`, or an empty store."""
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(results: dict, path: str | None) -> None:
    """Write `results` to `path` whole (nothing when `path` is None)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(results, path)


def check_settings(results: dict, settings: dict, path: str | None) -> None:
    """Record `settings` in a benchmark's `results`, or refuse (naming what differs) a file whose runs were made with
    other settings, or with none recorded: a resumed run must not mix them."""
    kept = results.get("settings") or {}
    if results and kept != settings:
        changed = {k: (kept.get(k), v) for k, v in settings.items() if kept.get(k) != v}
        raise SystemExit(f"{path} holds runs with other settings (file, asked): {changed}; use another file.")
    results["settings"] = settings


class Results:
    """Per-seed results kept in a JSON file, so an interrupted or extended run resumes where it stopped:
    `{scenario: {method: {metric: {seed: value}}}}`, with the wall time of every run under `"seconds"` and the
    data and training settings under `"settings"`. A file that holds runs with other settings is refused.

    Args:
        path (`str` or None): the file (None: kept in memory only).
        settings (`dict`): what every run of the file shares.
        order (`list[str]`): the methods in the order tables list them.
    """

    def __init__(self, path, settings, order=()):
        self.path = path
        self.order = list(order)
        self.data = load(path)
        check_settings(self.data, settings, path)

    def has(self, scenario, method, seed):
        return any(str(seed) in v for v in self.data.get(scenario, {}).get(method, {}).values())

    def add(self, scenario, method, seed, seconds=None, **metrics):
        for metric, value in metrics.items():
            self.data.setdefault(scenario, {}).setdefault(method, {}).setdefault(metric, {})[str(seed)] = value
        if seconds is not None:
            self.data.setdefault("seconds", {}).setdefault(scenario, {}).setdefault(method, {})[str(seed)] = seconds
        save(self.data, self.path)

    def table(self, scenario, seeds):
        """`{method: {metric: [value per seed]}}` over those of `seeds` each method has run on."""
        out = {}
        order = self.order
        runs = self.data.get(scenario, {})
        for method in sorted(runs, key=lambda m: order.index(m) if m in order else len(order)):
            metrics = runs[method]
            done = [s for s in seeds if all(str(s) in v for v in metrics.values())]
            if done:
                out[method] = {m: [v[str(s)] for s in done] for m, v in metrics.items()}
        return out
