"""Every place trl_ica depends on a private detail of TRL, transformers or bitsandbytes, one small function each.

Each function names the upstream code it mirrors. When that code has moved, the function raises [`SeamError`],
naming the seam and the installed versions, instead of returning something that would let training or scoring go on
silently different (an unweighted loss, a cache that is not shared). `tests/test_seams.py` runs every seam against
the installed packages, so an upgrade that moves one fails there first, with the same message.

The trainers' weighting seams (TRL's fused LM head output, DPO's loss terms, CPO's forward) are read here; whether a
training step actually went through them is checked by the trainers themselves: a step the weights did not reach
raises (see `ICATrainerMixin.unweighted_error`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys

import torch

TESTED = "trl 1.16 and transformers 5.23-5.24"


def versions() -> str:
    """`trl X, transformers Y, bitsandbytes Z` as installed (bitsandbytes only when it is)."""
    out = []
    for name in ("trl", "transformers", "bitsandbytes"):
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(out)


class SeamError(RuntimeError):
    """A private detail of TRL, transformers or bitsandbytes that trl_ica relies on is not what it was."""

    def __init__(self, seam: str, detail: str):
        self.seam = seam
        super().__init__(
            f"trl_ica relies on {seam}, which the installed packages ({versions()}) no longer provide as expected: "
            f"{detail}. trl_ica is tested with {TESTED}: install those, or report the versions above."
        )


# --- transformers: KV caches -----------------------------------------------------------------------------------------


def cache_key_values(cache) -> list[tuple]:
    """Per-layer `(keys, values)` of a transformers cache: `DynamicCache.layers[i].keys` / `.values`
    (`transformers.cache_utils.DynamicLayer`, transformers 5)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise SeamError(
            "`DynamicCache.layers[i].keys/.values` (transformers.cache_utils)",
            f"a {type(cache).__name__} without per-layer `keys`/`values`",
        )
    return [(layer.keys, layer.values) for layer in layers]


def full_cache(layers: list[tuple] | None = None):
    """A `DynamicCache` whose every layer keeps every position (`DynamicCache(ddp_cache_data=...)` without a config,
    transformers.cache_utils), started from `layers`' `(k, v)` pairs if given; its `update` concatenates into new
    tensors, so `layers` are never written.

    A cache built from the model's config cuts a sliding-window layer to its window (`DynamicSlidingWindowLayer`), so
    its length is no longer the prefix's and a continuation's mask offsets go wrong. With every position kept, the
    model's own mask still applies each layer's window (its mask functions work on absolute positions), so scores
    equal a plain forward whatever the prefix length; the cost is the keys a window would have dropped."""
    from transformers import DynamicCache

    try:
        return DynamicCache() if layers is None else DynamicCache(ddp_cache_data=list(layers))
    except TypeError as error:
        raise SeamError("`DynamicCache(ddp_cache_data=...)` (transformers.cache_utils)", str(error)) from None


def shared_prefix_cache(layers: list[tuple], batch: int):
    """A [`full_cache`] in which `batch` rows start from the same prefix keys and values, expanded without copying;
    the cache's `update` concatenates into new tensors, so the shared prefix is never written. For generation, which
    needs the cache to grow; [`read_only_prefix_cache`] scores without keeping the copies."""
    return full_cache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in layers])


_READ_ONLY_LAYER = None


def _read_only_layer_class():
    """`DynamicLayer` (transformers.cache_utils) holding a batch-1 prefix that every row of a batch reads: `update`
    returns the prefix expanded to the batch and joined to the new keys and values, and keeps nothing. Defined on
    first use, so that importing trl_ica does not import transformers' cache module."""
    global _READ_ONLY_LAYER
    if _READ_ONLY_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class ReadOnlyPrefixLayer(DynamicLayer):
            def __init__(self, keys, values):
                super().__init__()
                self.dtype, self.device = keys.dtype, keys.device
                self.keys, self.values = keys, values
                self.is_initialized = True

            def update(self, key_states, value_states, *args, **kwargs):
                batch = key_states.shape[0]
                keys = torch.cat([self.keys.expand(batch, -1, -1, -1).to(key_states.dtype), key_states], dim=-2)
                values = torch.cat([self.values.expand(batch, -1, -1, -1).to(value_states.dtype), value_states], -2)
                return keys, values

        _READ_ONLY_LAYER = ReadOnlyPrefixLayer
    return _READ_ONLY_LAYER


def read_only_prefix_cache(layers: list[tuple]):
    """A cache (`transformers.Cache(layers=...)` of `DynamicLayer` subclasses, transformers.cache_utils) from which
    every row of a batch reads the batch-1 prefix `layers` and which stores nothing: each layer's keys and values
    for the batch exist only while that layer attends, never all layers' at once, and the prefix itself is held
    once. Its length stays the prefix's, so the model's masks and positions are those of a continuation."""
    from transformers.cache_utils import Cache

    layer_class = _read_only_layer_class()
    try:
        return Cache(layers=[layer_class(k, v) for k, v in layers])
    except TypeError as error:
        raise SeamError("`Cache(layers=[...])` (transformers.cache_utils)", str(error)) from None


def cache_argument(module) -> str:
    """The keyword a transformers model's forward takes its KV cache by: `cache` (transformers 5.25+, where
    `past_key_values` is deprecated) or `past_key_values`."""
    import inspect

    parameters = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise SeamError(
        f"a `cache` or `past_key_values` argument of `{type(module).__name__}.forward` (transformers)",
        "the forward takes neither",
    )


SHAREABLE_LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_layer_types(config) -> list[str]:
    """The attention kind of each decoder layer: the text config's `layer_types`, or, for configs without it, as
    transformers infers it (`get_layer_types_and_kwargs`, transformers.cache_utils): `sliding_attention` when a
    `sliding_window` is set, `chunked_attention` with an `attention_chunk_size`, else `full_attention`. A layer that
    reads another layer's keys and values (`kv_sharing_modes` "reuse", `num_kv_shared_layers`) counts as
    `shared_kv`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or 1
    types = getattr(text, "layer_types", None)
    if types is None:
        if getattr(text, "sliding_window", None) is not None:
            types = ["sliding_attention"] * layers
        elif getattr(text, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * layers
        else:
            types = ["full_attention"] * layers
    types = list(types)
    modes = getattr(text, "kv_sharing_modes", None)
    if modes is not None:
        types = ["shared_kv" if mode == "reuse" else kind for kind, mode in zip(types, modes)]
    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    if shared:
        types[len(types) - shared :] = ["shared_kv"] * shared
    return types


# --- transformers: models ------------------------------------------------------------------------------------------


def decoder_layers(backbone):
    """The decoder layers of a model's backbone, each with its attention module: `backbone.layers[i].self_attn`, as
    every decoder-only model of transformers lays them out."""
    layers = getattr(backbone, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(layers[0], "self_attn"):
        raise ValueError(f"{type(backbone).__name__} has no `layers[i].self_attn`; Data Whisperer cannot read it.")
    return layers


@contextlib.contextmanager
def attention_wrapped(attention_module, wrap):
    """Within the block, every attention call of the model runs `wrap(original)(module, query, key, value,
    attention_mask, **kwargs)`, where `original` is the function the model would have called.

    Mirrors how a transformers 5 attention layer picks its function: `ALL_ATTENTION_FUNCTIONS` (a global mapping with
    a per-name local override, `_local_mapping`) by the config's `_attn_implementation`, or for `"eager"` the
    modeling file's own `eager_attention_forward`. The local override is restored afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(attention_module.config, "_attn_implementation", None)
    local = getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", None)
    if name is None or not isinstance(local, dict):
        raise SeamError(
            "`config._attn_implementation` and `ALL_ATTENTION_FUNCTIONS._local_mapping` (transformers.modeling_utils)",
            f"implementation {name!r}, local mapping {type(local).__name__}",
        )
    had_local, previous = name in local, local.get(name)
    original = ALL_ATTENTION_FUNCTIONS.get_interface(name, None) if name != "eager" else None
    if original is None:  # eager: the modeling file's own function
        original = getattr(sys.modules[type(attention_module).__module__], "eager_attention_forward", None)
        if original is None:
            raise SeamError(
                f"`eager_attention_forward` in {type(attention_module).__module__}",
                "the modeling file defines no such function",
            )
    ALL_ATTENTION_FUNCTIONS[name] = wrap(original)
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[name] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[name]


def loaded_from(config) -> str:
    """Where a model was loaded from: `PretrainedConfig._name_or_path` (the Hub id or folder given to
    `from_pretrained`; empty for a model built from a config)."""
    return getattr(config, "_name_or_path", "") or ""


@contextlib.contextmanager
def reported_as(config, name: str | None):
    """Within the block the config says it was loaded from `name` (TRL's model card reads `config._name_or_path`,
    `trl.trainer.utils.get_config_model_id`); restored afterwards. `None` changes nothing."""
    previous = loaded_from(config)
    if name:
        config._name_or_path = name
    try:
        yield
    finally:
        config._name_or_path = previous


@contextlib.contextmanager
def whole_model_loading():
    """Within the block `from_pretrained` loads a whole model on each process even while a DeepSpeed ZeRO-3 config is
    registered (accelerate registers it for `zero3_init_flag`, `transformers.integrations.deepspeed.
    set_hf_deepspeed_config`, and `from_pretrained` then partitions every model it loads): a scoring model is
    replicated, not partitioned, since no DeepSpeed engine gathers its parameters. The registration is restored."""
    from transformers.integrations import deepspeed as hf_deepspeed

    names = ("_hf_deepspeed_config_weak_ref", "set_hf_deepspeed_config", "unset_hf_deepspeed_config")
    if not all(hasattr(hf_deepspeed, name) for name in names):
        seam = "transformers.integrations.deepspeed's registered ZeRO-3 config (`_hf_deepspeed_config_weak_ref`)"
        raise SeamError(seam, "it, `set_hf_deepspeed_config` or `unset_hf_deepspeed_config` is gone")
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    registered = reference() if reference is not None else None
    if registered is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(registered)


# --- bitsandbytes --------------------------------------------------------------------------------------------------


def repacks_in_eval(module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit layer that, on CPUs with AVX512-BF16, repacks its weights for
    inference on an eval-mode no-grad forward, after which training gets no gradient through it (bitsandbytes
    `Linear4bit.support_avx512bf16_for_cpu`, 0.48+)."""
    return hasattr(module, "support_avx512bf16_for_cpu")


# --- transformers.Trainer ------------------------------------------------------------------------------------------


def add_signature_column(trainer, column: str) -> None:
    """Keep `column` in the batches: `Trainer._set_signature_columns_if_needed` fills `trainer._signature_columns`,
    the columns `_remove_unused_columns` keeps; call after it."""
    columns = getattr(trainer, "_signature_columns", None)
    if columns is None:
        raise SeamError(
            "`Trainer._signature_columns` (transformers.trainer)",
            "it is not set after `_set_signature_columns_if_needed`",
        )
    if column not in columns:
        trainer._signature_columns = [*columns, column]


def checkpoint_folder(trainer, trial) -> str:
    """The folder `Trainer._save_checkpoint` has just written: `_get_output_dir(trial)/checkpoint-{global_step}`."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    get_output_dir = getattr(trainer, "_get_output_dir", None)
    if get_output_dir is None:
        raise SeamError("`Trainer._get_output_dir(trial)` (transformers.trainer)", "the method is gone")
    return os.path.join(get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def histogram_writers(trainer):
    """`(tensorboard_writers, wandb_modules)` of the trainer's reporting callbacks that are live: transformers'
    `TensorBoardCallback.tb_writer` (a `SummaryWriter` once training began) and `WandbCallback._wandb` once
    `_initialized`."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    tensorboard, wandb = [], []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
            tensorboard.append(callback.tb_writer)
        elif isinstance(callback, WandbCallback) and getattr(callback, "_initialized", False):
            wandb.append(callback._wandb)
    return tensorboard, wandb


def trainer_methods_missing() -> list[str]:
    """The `transformers.Trainer` methods the ICA trainers override that the installed Trainer lacks: an override of a
    method that is no longer called would silently do nothing."""
    from transformers import Trainer

    wanted = (
        "get_batch_samples",
        "training_step",
        "compute_loss",
        "_save_checkpoint",
        "_set_signature_columns_if_needed",
        "_get_output_dir",
        "log",
        "save_model",
        "create_model_card",
    )
    return [name for name in wanted if not callable(getattr(Trainer, name, None))]


# --- TRL -----------------------------------------------------------------------------------------------------------


def train_metrics(trainer):
    """TRL's per-mode metric lists, which its `log` averages and writes with the trainer's own logs:
    `trainer._metrics["train"][key]` (a `defaultdict(list)`, SFTTrainer and DPOTrainer)."""
    metrics = getattr(trainer, "_metrics", None)
    if not isinstance(metrics, dict) or "train" not in metrics:
        raise SeamError("`trainer._metrics['train']` (trl SFTTrainer, DPOTrainer)", "no such metric store")
    return metrics["train"]


def training_chat_template(trainer) -> str | None:
    """The chat template a TRL trainer renders conversations with when it keeps its own (`trainer.chat_template`,
    set by TRL trainers from `chat_template_path`); `None` when it has written it onto the tokenizer instead."""
    return getattr(trainer, "chat_template", None)


def logit_transform(config) -> tuple[float, float | None]:
    """`(scale, softcap)` such that the model's logits are `softcap * tanh(scale * head(h) / softcap)` (no tanh when
    `softcap` is None): what a model's forward applies after its LM head, read from its (text) config exactly as
    TRL's fused LM head reads it (`trl.trainer.utils.add_fused_lm_head`, TRL 1.16), so that log p(y | x) read off a
    TRL training forward and the engine's log p(y | D, x) use one definition. `logit_scale` (Cohere) or
    `output_multiplier` multiply; `lm_head_multiplier` (Falcon-H1) multiplies; `logits_scaling` divides (Granite,
    MiniCPM3; HyperCLOVA X multiplies); `final_logit_softcapping` caps (Gemma 2/3)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap


def fused_log_probs(kwargs: dict, output):
    """The per-token log-probabilities `(B, T-1)` of a forward called through TRL's fused LM head
    (`trl.trainer.utils.add_fused_lm_head`: `model(..., fused_lm_head=True)` returns a `FusedLMHeadOutput` whose
    `log_probs` are zero where the label is -100 and which TRL reduces after the forward), or `None` for any other
    forward. The trainers scale these in a forward hook; whether the hook fired is checked per step."""
    if not kwargs.get("fused_lm_head"):
        return None
    return getattr(output, "log_probs", None)


def sequence_sharding(accelerator) -> dict[str, str]:
    """How accelerate shards each sequence across processes (`Accelerator.parallelism_config`, accelerate >= 1.12):
    `{"sp": backend}` under sequence parallelism (Ulysses/ALST) and `{"cp": "cp_size=N"}` under context parallelism,
    empty otherwise. TRL's SFT computes the loss inside the model's forward under DeepSpeed sequence parallelism
    (`SFTTrainer.compute_loss`), and both shard the tokens of each row between processes."""
    config = getattr(accelerator, "parallelism_config", None)
    out = {}
    if config is not None and getattr(config, "sp_enabled", False):
        out["sp"] = f"sp_size={config.sp_size}, sp_backend={config.sp_backend!r}"
    if config is not None and getattr(config, "cp_enabled", False):
        out["cp"] = f"cp_size={config.cp_size}"
    return out


def sft_loss_mask_columns(columns, completion_only_loss: bool) -> list[str] | None:
    """The columns whose product says which tokens of a pre-tokenised row carry loss, as
    `SFTTrainer._prepare_dataset` builds `labels` (trl.trainer.sft_trainer): None when the row has `labels` (used as
    they are); else `completion_mask` when `completion_only_loss` and `assistant_masks`, whichever are there; no
    column means every token. A test compares the result with TRL's own labels, so a change there shows."""
    if "labels" in columns:
        return None
    masks = ["completion_mask"] if completion_only_loss and "completion_mask" in columns else []
    return masks + (["assistant_masks"] if "assistant_masks" in columns else [])


def sft_prepare_packed(prepare, dataset, processing_class, args, formatting_func, dataset_name: str, keep: str):
    """`SFTTrainer._prepare_dataset` with packing (trl.trainer.sft_trainer), keeping the per-token column `keep`.

    TRL keeps only `input_ids` and `labels` before it packs (`dataset.select_columns(["input_ids", "labels"])`), which
    would drop which example each token came from. This runs TRL's preparation (`prepare`, the parent method) without
    packing, truncation or shuffling, then TRL's packing steps as TRL runs them: the columns selected (with `keep`),
    shuffled with `args.seed` when `shuffle_dataset`, `pack_dataset(dataset, max_length, packing_strategy)`, shuffled
    again. A test checks that the packed rows equal TRL's own, so a change to TRL's packing shows."""
    import copy

    from datasets import Dataset
    from trl import pack_dataset

    unpacked = copy.copy(args)  # no truncation (packing cuts to max_length) and no shuffle yet, as TRL's path has
    unpacked.max_length, unpacked.shuffle_dataset = None, False
    dataset = prepare(dataset, processing_class, unpacked, False, formatting_func, dataset_name)
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) and args.dataset_num_proc else {}
    dataset = dataset.select_columns(["input_ids", "labels", keep])
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


def packed_sequence_index(inputs: dict):
    """Padding-free SFT: the packed sequence each position belongs to, `inputs["seq_idx"]` (TRL's
    `DataCollatorForLanguageModeling` with `padding_free=True`), or `None`."""
    return inputs.get("seq_idx")


@contextlib.contextmanager
def dpo_loss_terms(trainer, loss_types: list[str], loss_weights: list[float], use_weighting: bool):
    """Within the block `DPOTrainer.compute_loss` computes the loss terms `loss_types` with `loss_weights` and
    multiplies each pair's loss by its WPO factor when `use_weighting`: TRL reads `self.loss_types`,
    `self.loss_weights` and `self.use_weighting` (set from the config in `DPOTrainer.__init__`) at every step.
    Restored afterwards."""
    names = ("loss_types", "loss_weights", "use_weighting")
    missing = [name for name in names if not hasattr(trainer, name)]
    if missing:
        raise SeamError(
            "`DPOTrainer.loss_types/loss_weights/use_weighting` (trl.trainer.dpo_trainer)",
            f"the trainer has no {missing}",
        )
    previous = [getattr(trainer, name) for name in names]
    trainer.loss_types, trainer.loss_weights, trainer.use_weighting = loss_types, loss_weights, use_weighting
    try:
        yield
    finally:
        for name, value in zip(names, previous):
            setattr(trainer, name, value)


def dpo_weighting_fields(output, wpo: bool):
    """`(label_mask, log_sum_sq_probs)` of the policy's fused-head output in `DPOTrainer.compute_loss`: TRL's WPO
    factor is `exp(mean_t(log_probs - log_sum_sq_probs))` over the completion tokens (`label_mask`). TRL's head
    computes `log_sum_sq_probs` only for `use_weighting=True` (`wpo`); otherwise it is `None` here."""
    mask, lssp = getattr(output, "label_mask", None), getattr(output, "log_sum_sq_probs", None)
    if mask is None or (wpo and lssp is None):
        raise SeamError(
            "`FusedLMHeadOutput.label_mask` and `.log_sum_sq_probs` (trl.trainer.utils.add_fused_lm_head)",
            f"the DPO policy forward returned label_mask={type(mask).__name__}, log_sum_sq_probs="
            f"{type(lssp).__name__} (use_weighting={wpo})",
        )
    return mask, lssp


def dpo_set_pair_factor(output, log_probs: torch.Tensor, weights: torch.Tensor, wpo: bool) -> None:
    """Make the factor `DPOTrainer.compute_loss` multiplies each pair's loss by, before the batch mean, equal to
    `weights` (`(B,)`; times TRL's own WPO factor when `wpo`), for every loss type. Needs `use_weighting=True` for
    the call ([`dpo_loss_terms`]).

    TRL's factor (its WPO weighting, trl.trainer.dpo_trainer) is `exp(mean_t(log_probs - log_sum_sq_probs))` over
    the completion tokens (`label_mask`) of the chosen row times that of the rejected row, computed under `no_grad`
    and applied as `per_sequence_loss *= factor`. Setting `log_sum_sq_probs` to `log_probs - log w_i` on the chosen
    row's completion tokens makes it `w_i` (a weight of 0 works through `-inf`). `log_probs` is the policy's
    `(2B, T-1)` output, chosen rows first. TRL applies the factor in place, which autograd refuses for the hinge
    loss (`relu` keeps its output for the backward); [`_OutOfPlaceProduct`] makes that one product out of place."""
    label_mask, log_sum_sq_probs = dpo_weighting_fields(output, wpo)
    _APPLIED_FACTORS.clear()  # a new forward: the products of this step's loss are recorded afresh
    shift = torch.cat([torch.log(weights), torch.zeros_like(weights)])[:, None]
    base = (log_sum_sq_probs if wpo else log_probs.detach()).float()
    output.log_sum_sq_probs = torch.where(label_mask, base - shift, base).as_subclass(_OutOfPlaceProduct)


#: The factors TRL multiplied a loss by, since the last [`dpo_set_pair_factor`] ([`dpo_applied_factors`]).
_APPLIED_FACTORS: list[torch.Tensor] = []


def dpo_applied_factors() -> list[torch.Tensor]:
    """The per-pair factors `DPOTrainer.compute_loss` multiplied a loss by (`per_sequence_loss *= factor`) since the
    policy's forward set them ([`dpo_set_pair_factor`]), one per loss type: empty when TRL did not apply them."""
    return list(_APPLIED_FACTORS)


class _OutOfPlaceProduct(torch.Tensor):
    """A tensor whose descendants turn `loss *= factor` into `loss = loss * factor`, returning a plain tensor, and
    record `factor` ([`dpo_applied_factors`]).

    TRL scales each pair's loss in place with a factor computed from `log_sum_sq_probs`; in place, the product breaks
    the backward of losses that keep their output (the hinge loss's `relu`). Every other operation behaves as usual.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.mul_, torch.Tensor.__imul__) and type(args[0]) is torch.Tensor:
            target, factor = args
            factor = factor.as_subclass(torch.Tensor)
            _APPLIED_FACTORS.append(factor.detach())
            return target * factor
        return super().__torch_function__(func, types, args, kwargs or {})


def cpo_labels(trainer, batch: dict, device):
    """The labels of a CPO batch, chosen rows then rejected, as `CPOTrainer.concatenated_forward` computes its
    log-probabilities from them: `concatenated_inputs(batch, padding_value=..., device=...)["concatenated_labels"]`
    (trl.experimental.cpo)."""
    try:
        inputs = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id, device=device)
        return inputs["concatenated_labels"]
    except (TypeError, KeyError, AttributeError) as error:
        raise SeamError(
            "`CPOTrainer.concatenated_inputs(...)['concatenated_labels']` (trl.experimental.cpo)",
            f"{type(error).__name__}: {error}",
        ) from None


def cpo_forward_outputs(out) -> tuple:
    """`(chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss, rest)` of
    `CPOTrainer.concatenated_forward`'s return (a tuple of 5, plus the auxiliary loss for router models)."""
    if not isinstance(out, tuple) or len(out) < 5:
        raise SeamError(
            "the 5-tuple returned by `CPOTrainer.concatenated_forward` (trl.experimental.cpo)",
            f"it returned {type(out).__name__} of length {len(out) if isinstance(out, tuple) else '-'}",
        )
    return (*out[:5], out[5:])
