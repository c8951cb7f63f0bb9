"""A scoring model of its own: a fixed causal LM, with its own tokenizer, that computes the ICA scores instead of the
model being trained (`ica_scoring_model`, or the trainers' `scoring_model=`).

A larger scorer ranks noise a small trained model cannot see; a smaller one costs a fraction of scoring under the
trained model. Weights are per example, so the two tokenizers need not match: rows are rendered with the scorer's
own tokenizer and chat template. The scorer is never trained, so its scores do not change during a run.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from .. import seams

logger = logging.getLogger(__name__)


@dataclass
class ScoringModel:
    """A scoring model, its tokenizer, and the name it is recorded under (its Hub id or folder)."""

    model: torch.nn.Module
    tokenizer: object
    name: str


def model_dtype(model) -> torch.dtype | None:
    """The dtype of `model`'s first floating-point parameter (4-bit models keep their compute dtype there too)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def load_scoring_model(
    model,
    tokenizer=None,
    *,
    dtype: torch.dtype | str | None = None,
    device=None,
    trust_remote_code: bool = False,
    argument: str = "ica_scoring_model",
) -> ScoringModel:
    """The scorer `model` (a Hub id, a folder, or a loaded causal LM) with its tokenizer, in eval mode and without
    gradients, on `device`.

    A name is loaded in `dtype` (default: the checkpoint's own), with its tokenizer unless `tokenizer` is given. A
    loaded model is used in its own dtype; it is moved to `device` unless it is quantised or placed by a device map;
    its tokenizer is `tokenizer`, else loaded from where the model was (`config._name_or_path`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    from ..embedded import check_model_path, resolve_model

    if isinstance(model, str):
        if not model.strip():
            raise ValueError(f"`{argument}` must be a Hub id or a model folder, got an empty string.")
        path = resolve_model(model)
        check_model_path(path, argument)
        with seams.whole_model_loading():  # replicated on each process, also under DeepSpeed ZeRO-3
            loaded = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype if dtype is not None else "auto", trust_remote_code=trust_remote_code
            )
        name = model
    elif isinstance(model, PreTrainedModel):
        loaded, path = model, seams.loaded_from(model.config)
        name = path or type(model).__name__
    else:
        raise ValueError(
            f"`{argument}` must be a Hub id, a model folder or a loaded causal LM (a transformers PreTrainedModel), "
            f"got {type(model).__name__}."
        )
    if tokenizer is None:
        if not path:
            raise ValueError(
                f"`{argument}` is a model built from a config: it has no folder to load its tokenizer from. Pass its "
                "tokenizer too (`scoring_processing_class`)."
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(tokenizer, "pad_token", "") is None:
        tokenizer.pad_token = tokenizer.eos_token
    placed = getattr(loaded, "hf_device_map", None) or getattr(loaded, "is_quantized", False)
    if device is not None and not placed:
        loaded.to(device)
    loaded.eval()
    loaded.requires_grad_(False)
    return ScoringModel(loaded, tokenizer, name)


def release(scorer: ScoringModel | None) -> None:
    """Drop `scorer`'s weights and return the accelerator memory they held (the caller drops its references)."""
    if scorer is None:
        return
    device = next((p.device for p in scorer.model.parameters()), torch.device("cpu"))
    scorer.model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logger.info("The scoring model %s is freed: its scores are final.", scorer.name)
