"""Reading datasets from local files or the Hub, and writing scored rows."""

from __future__ import annotations

import os

from datasets import Dataset

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_splits(spec: str, argument: str = "--dataset", config: str | None = None):
    """Every split of a local `.json`/`.jsonl`/`.parquet` file (one split, `"train"`), a local folder of data files,
    or a Hub dataset (with its configuration `config`), as a `DatasetDict`."""
    from datasets import load_dataset

    extension = os.path.splitext(spec)[1].lower()
    if extension in FILE_FORMATS:
        if not os.path.isfile(spec):
            raise ValueError(f"`{argument}` file {spec!r} does not exist.")
        if os.path.getsize(spec) == 0:
            raise ValueError(f"`{argument}` file {spec!r} is empty.")
        if config is not None:
            raise ValueError(f"`{argument}`={spec!r} is a local file: it has no configuration, got {config!r}.")
        return load_dataset(FILE_FORMATS[extension], data_files=spec)
    if os.path.exists(spec) and not os.path.isdir(spec):
        raise ValueError(
            f"`{argument}`={spec!r} is a local file but does not end in {sorted(FILE_FORMATS)}; pass a .json, "
            ".jsonl or .parquet file, a folder of them, or a Hub dataset name."
        )
    return load_dataset(spec, name=config)  # a local folder or a Hub dataset


def pick_split(splits, split: str, spec: str, argument: str = "--dataset") -> Dataset:
    """`splits[split]`, refusing a split that is not there (a local file has only `"train"`) or has no rows."""
    if split not in splits:
        raise ValueError(f"`{argument}` {spec!r} has no split {split!r}; its splits are {sorted(splits)}.")
    dataset = splits[split]
    if len(dataset) == 0:
        raise ValueError(f"`{argument}` {spec!r} has no rows in split {split!r}.")
    return dataset


def load_rows(spec: str, split: str = "train", argument: str = "--dataset", config: str | None = None) -> Dataset:
    """One split of a local `.json`/`.jsonl`/`.parquet` file (its only split is `"train"`), a local folder of data
    files, or a Hub dataset (with its configuration `config`)."""
    return pick_split(load_splits(spec, argument, config), split, spec, argument)


def write_rows(dataset: Dataset, path: str, argument: str = "--output") -> str:
    """Write `dataset` as JSON lines or parquet, chosen by the file extension."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"`{argument}`={path!r} must end in .jsonl, .json or .parquet.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if extension == ".parquet":
        dataset.to_parquet(path)
    else:
        dataset.to_json(path, lines=True, force_ascii=False)
    return path


SCORES_META = ".meta.json"


def scores_meta_path(path: str) -> str:
    """The settings file written beside a scores file: `scored.jsonl` -> `scored.meta.json`."""
    return os.path.splitext(path)[0] + SCORES_META


def write_json(data, path: str) -> None:
    """Write `data` as JSON whole: to a temporary file moved into place, so a reader never sees half a file."""
    import json

    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)


def read_scores_file(path: str, dataset: Dataset, expected: dict, argument: str = "ica_scores_file"):
    """The scores of `path` (written by `trl-ica score`) for the rows of `dataset`, after checking that the file's
    rows are `dataset`'s rows in order and that its recorded settings equal `expected`."""
    import json

    import numpy as np

    meta_path = scores_meta_path(path)
    if not os.path.isfile(meta_path):
        raise ValueError(
            f"`{argument}`={path!r} has no settings file {meta_path!r} beside it (`trl-ica score` writes one): "
            "without it the scores cannot be checked against this run's form and demonstrations."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    changed = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: file {a!r}, run {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"`{argument}`={path!r} was scored with other settings than this run's ({listed}).")
    scored = load_rows(path, argument=argument)
    if "score" not in scored.column_names:
        raise ValueError(f"`{argument}`={path!r} has no 'score' column.")
    if len(scored) != len(dataset):
        raise ValueError(f"`{argument}`={path!r} has {len(scored)} rows; the training set has {len(dataset)}.")
    columns = [c for c in dataset.column_names if c != "score"]
    missing = [c for c in columns if c not in scored.column_names]
    if missing:
        raise ValueError(f"`{argument}`={path!r} lacks the training set's columns {missing}.")
    for i, (mine, theirs) in enumerate(zip(dataset.select_columns(columns), scored.select_columns(columns))):
        if json.dumps(mine, sort_keys=True, default=str) != json.dumps(theirs, sort_keys=True, default=str):
            differ = [c for c in columns if mine[c] != theirs[c]]
            raise ValueError(
                f"`{argument}`={path!r}: row {i} is not training row {i} (columns {differ} differ); the file must "
                "hold the training rows in their order."
            )
    return np.asarray(scored["score"], dtype=np.float64)
