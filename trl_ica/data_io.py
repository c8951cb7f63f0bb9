"""Reading datasets from local files or the Hub, and writing scored rows."""

from __future__ import annotations

import os

from datasets import Dataset

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(spec: str, split: str = "train", argument: str = "--dataset") -> Dataset:
    """A local `.json`/`.jsonl`/`.parquet` file, or a Hub dataset name (its `split`)."""
    from datasets import load_dataset

    extension = os.path.splitext(spec)[1].lower()
    if extension in FILE_FORMATS:
        if not os.path.isfile(spec):
            raise ValueError(f"`{argument}` file {spec!r} does not exist.")
        if os.path.getsize(spec) == 0:
            raise ValueError(f"`{argument}` file {spec!r} is empty.")
        dataset = load_dataset(FILE_FORMATS[extension], data_files=spec, split="train")
    elif os.path.exists(spec):
        raise ValueError(
            f"`{argument}`={spec!r} is a local path but not a file ending in {sorted(FILE_FORMATS)}; "
            "pass a .json, .jsonl or .parquet file, or a Hub dataset name."
        )
    else:
        dataset = load_dataset(spec, split=split)
    if len(dataset) == 0:
        raise ValueError(f"`{argument}` {spec!r} has no rows.")
    return dataset


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
