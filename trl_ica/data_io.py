"""Reading datasets from local files or the Hub, and writing scored rows."""

from __future__ import annotations

import os
from contextlib import contextmanager

from datasets import Dataset

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_splits(spec: str, argument: str = "--dataset", config: str | None = None, streaming: bool = False):
    """Every split of a local `.json`/`.jsonl`/`.parquet` file (one split, `"train"`), a local folder of data files,
    or a Hub dataset (with its configuration `config`), as a `DatasetDict` (an `IterableDatasetDict` when
    `streaming`)."""
    from datasets import load_dataset

    extension = os.path.splitext(spec)[1].lower()
    if extension in FILE_FORMATS:
        if not os.path.isfile(spec):
            raise ValueError(f"`{argument}` file {spec!r} does not exist.")
        if os.path.getsize(spec) == 0:
            raise ValueError(f"`{argument}` file {spec!r} is empty.")
        if config is not None:
            raise ValueError(f"`{argument}`={spec!r} is a local file: it has no configuration, got {config!r}.")
        try:
            return load_dataset(FILE_FORMATS[extension], data_files=spec, streaming=streaming)
        except Exception as error:
            if extension in (".jsonl", ".json"):
                _raise_json_error(spec, argument, error)
            raise
    if os.path.exists(spec) and not os.path.isdir(spec):
        raise ValueError(
            f"`{argument}`={spec!r} is a local file but does not end in {sorted(FILE_FORMATS)}; pass a .json, "
            ".jsonl or .parquet file, a folder of them, or a Hub dataset name."
        )
    return load_dataset(spec, name=config, streaming=streaming)  # a local folder or a Hub dataset


def _raise_json_error(path: str, argument: str, error: Exception) -> None:
    """Name the first line of a JSON Lines file (or the position in a JSON file) that does not parse."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as bad:
            raise ValueError(f"`{argument}` file {path!r} is not valid JSON: {bad}.") from error
    first = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as bad:
            raise ValueError(
                f"`{argument}` file {path!r}, line {number}: not valid JSON ({bad.msg}): {line[:80]!r}"
            ) from error
        if not isinstance(value, dict):
            raise ValueError(
                f"`{argument}` file {path!r}, line {number}: a JSON {type(value).__name__}, not an object of columns."
            ) from error
        first = first or (number, sorted(value))
        if sorted(value) != first[1]:
            raise ValueError(
                f"`{argument}` file {path!r} mixes row formats: line {number} has columns {sorted(value)} but line "
                f"{first[0]} has {first[1]}; every row must have the same format."
            ) from error
    raise ValueError(f"`{argument}` file {path!r} could not be read as a dataset: {error}") from error


def pick_split(splits, split: str, spec: str, argument: str = "--dataset") -> Dataset:
    """`splits[split]`, refusing a split that is not there (a local file has only `"train"`) or has no rows."""
    if split not in splits:
        raise ValueError(f"`{argument}` {spec!r} has no split {split!r}; its splits are {sorted(splits)}.")
    dataset = splits[split]
    if isinstance(dataset, Dataset) and len(dataset) == 0:  # a stream's rows are counted as they arrive
        raise ValueError(f"`{argument}` {spec!r} has no rows in split {split!r}.")
    return dataset


def load_rows(spec: str, split: str = "train", argument: str = "--dataset", config: str | None = None) -> Dataset:
    """One split of a local `.json`/`.jsonl`/`.parquet` file (its only split is `"train"`), a local folder of data
    files, or a Hub dataset (with its configuration `config`)."""
    return pick_split(load_splits(spec, argument, config), split, spec, argument)


@contextmanager
def written_whole(path: str):
    """Yield a temporary path beside `path` to write to; when the block ends it is moved onto `path` in one step, so
    a reader (or an interrupted run) sees the old file or the whole new one, never part of one. On an error the
    temporary file is removed and `path` is left as it was. The temporary name keeps the extension, for writers
    that choose their format by it."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, extension = os.path.splitext(name)
    temporary = os.path.join(directory, f".{root}.{os.getpid()}.partial{extension}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_rows(dataset: Dataset, path: str, argument: str = "--output") -> str:
    """Write `dataset` whole (see [`written_whole`]): JSON lines for `.jsonl`, one JSON array for `.json` (what
    `json.load` reads), parquet for `.parquet`."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"`{argument}`={path!r} must end in .jsonl, .json or .parquet.")
    with written_whole(path) as temporary:
        if extension == ".parquet":
            dataset.to_parquet(temporary)
        else:
            # one batch for a .json array: datasets writes one array per batch
            batch = {} if extension == ".jsonl" else {"batch_size": max(1, len(dataset))}
            dataset.to_json(temporary, lines=extension == ".jsonl", force_ascii=False, **batch)
    return path


def same_file(a: str, b: str) -> bool:
    """Whether two paths name the same file (an existing one, or the same resolved path)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, inputs: dict[str, str | None], overwrite: bool, argument: str = "--output") -> None:
    """Refuse an output that is one of the `inputs` (`{argument: path}`), and an existing one unless `overwrite`."""
    for name, source in inputs.items():
        if source is not None and same_file(path, source):
            raise ValueError(f"`{argument}`={path!r} is the input `{name}`: writing it would replace the data read.")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"`{argument}`={path!r} exists; pass `--overwrite` to replace it, or choose another path.")


SCORES_META = ".meta.json"


def scores_meta_path(path: str) -> str:
    """The settings file written beside a scores file: `scored.jsonl` -> `scored.meta.json`."""
    return os.path.splitext(path)[0] + SCORES_META


def write_json(data, path: str) -> None:
    """Write `data` as JSON, whole (see [`written_whole`])."""
    import json

    with written_whole(path) as temporary, open(temporary, "w") as f:
        json.dump(data, f, indent=1)


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
    values = scored["score"]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing and meta.get("ica_score_span") is None:
        raise ValueError(f"`{argument}`={path!r}: rows {missing[:5]} have no score.")
    # JSON has no -inf: a response without the span `ica_score_span` scores is written as null
    return np.asarray([-np.inf if v is None else v for v in values], dtype=np.float64)
