"""The model plumbing that the scoring engine, the kNN embeddings and Data Whisperer share: the causal LM behind
accelerate, DDP and PEFT wrappers, its backbone and LM head, an eval mode that leaves 4-bit layers alone,
log-probabilities through the head in bounded chunks, right-padded batches and autocast to a compute dtype."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import seams


def unwrap_causal_lm(model):
    """The causal LM inside accelerate/DDP and PEFT wrappers (PEFT's injected adapter layers stay active)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def fsdp2_sharded(model) -> bool:
    """Whether any module of `model` is sharded by FSDP2 (`fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def sharded_forward(model) -> bool:
    """Whether a forward of `model` gathers parameters from other processes (FSDP2, DeepSpeed ZeRO-3): then every
    process must make the same model calls, and one that stops inside a forward leaves the others waiting."""
    lm = unwrap_causal_lm(model)
    return fsdp2_sharded(lm) or any(hasattr(p, "ds_id") for p in lm.parameters())


def heavy_forward(model) -> bool:
    """Whether every forward of `model` dequantises its weights (bitsandbytes 4-bit) or gathers them from other
    processes ([`sharded_forward`]): a fixed cost per forward that many more tokens would share."""
    lm = unwrap_causal_lm(model)
    if getattr(lm, "is_loaded_in_4bit", False) or any(type(p).__name__ == "Params4bit" for p in lm.parameters()):
        return True
    return sharded_forward(lm)


def execution_device(model) -> torch.device:
    """Where `model` computes: its first parameter's device, except under FSDP2 with CPU offload, where the shards
    rest on the CPU and every forward gathers them on the process's accelerator (accelerate's `PartialState`)."""
    lm = unwrap_causal_lm(model)
    device = next(lm.parameters()).device
    if device.type == "cpu" and fsdp2_sharded(lm):
        from accelerate import PartialState

        return PartialState().device
    return device


def head_rows(head) -> int:
    """The LM head's vocabulary: its `out_features` (a `Linear` keeps it when DeepSpeed ZeRO-3 partitions the
    weight, whose local shape is then 0), else the weight's full shape (`ds_shape` under ZeRO-3)."""
    rows = getattr(head, "out_features", None)
    if isinstance(rows, int) and rows > 0:
        return rows
    return int(getattr(head.weight, "ds_shape", head.weight.shape)[0])


def backbone_and_head(model):
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, lm.base_model_prefix)
    if head is None or backbone is None:
        raise ValueError(f"{type(lm).__name__} is not a causal language model with an output embedding.")
    return lm, backbone, head


@contextlib.contextmanager
def eval_mode(model):
    """Put `model` in eval mode and restore each module's previous mode afterwards.

    bitsandbytes' 4-bit layers are left in training mode: on CPUs with AVX512-BF16 an eval-mode, no-grad forward
    repacks their weights for inference once and for all, after which training gets no gradient through them.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for module in model.modules():
        if seams.repacks_in_eval(module):
            module.training = True  # their mode changes nothing else: they have no dropout
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


HEAD_BYTES = 256 * 2**20  # float32 logits per LM-head call: 512 positions of a 128k vocabulary, 1,365 of 49k


def head_chunk(vocab_size: int) -> int:
    """Positions per LM-head call so that a call's float32 logits take at most `HEAD_BYTES` (the log-sum-exp and
    the soft-capping make temporaries of the same size)."""
    return max(1, HEAD_BYTES // (4 * max(1, vocab_size)))


def head_log_probs(lm, head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Log-probabilities of `targets` (N,) under the LM head applied to `hidden` (N, H), in float32 (float64 for a
    float64 model), `chunk` positions per head call (default: [`head_chunk`] of the head's vocabulary).

    `logit[target] - logsumexp(logits)` rather than `log_softmax`: on the CPU, PyTorch's float32 `log_softmax` over a
    large vocabulary is biased (about +2e-5 nats per token over 49k entries, always the same sign, so a sum over
    hundreds of tokens drifts by 1e-3), while its float32 `logsumexp` is not (see docs/benchmarks.md). Logits of a
    bf16 or fp16 head are raised to float32 before the log-sum-exp."""
    chunk = chunk or head_chunk(head_rows(head))
    scale, softcap = seams.logit_transform(lm.config)
    out = []
    for start in range(0, hidden.size(0), chunk):
        logits = head(hidden[start : start + chunk])
        if logits.dtype != torch.float64:
            logits = logits.float()
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        target = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        out.append(target - torch.logsumexp(logits, -1))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=dtype)


def pad_id(lm) -> int:
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def padded_batch(sequences, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(ids, mask)` of token sequences, `(B, longest)` long tensors on `device`: filled on the CPU and
    moved in one copy each, rather than one small host-to-device copy per row."""
    length = max(len(x) for x in sequences)
    ids = np.full((len(sequences), length), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def autocast_to(device: torch.device, compute_dtype, weights_dtype):
    """Autocast to `compute_dtype` when it differs from the weights' floating dtype (what accelerate's mixed
    precision does around `model.forward`); otherwise nothing."""
    if compute_dtype is None or compute_dtype == weights_dtype or not weights_dtype.is_floating_point:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)
