"""The embedded default model's identity: the name that stands for it, the Hub model it was converted from, and
where its converted copy is cached. The conversion itself is [`trl_ica.cli.assets`]; the model card reads only
this, so that a card never loads or converts a model."""

from __future__ import annotations

import os

#: The name that stands for the embedded default wherever a model name or path is taken.
DEFAULT_MODEL = "smollm2-135m-instruct"
#: The Hub model the embedded default was converted from.
EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Converted copies are cache folders named this plus the hash of the GGUF they came from.
CACHE_PREFIX = "SmolLM2-135M-Instruct-"


def cache_dir() -> str:
    """Where converted assets live: `$TRL_ICA_CACHE`, else `$XDG_CACHE_HOME/trl_ica` or `~/.cache/trl_ica`."""
    root = os.environ.get("TRL_ICA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "trl_ica"
    )
    os.makedirs(root, exist_ok=True)
    return root


def is_embedded_model_dir(path: str) -> bool:
    """Whether `path` is a converted copy of the embedded default in the cache, without converting anything."""
    folder = os.path.realpath(path)
    in_cache = os.path.dirname(folder) == os.path.realpath(cache_dir())
    return in_cache and os.path.basename(folder).startswith(CACHE_PREFIX)
