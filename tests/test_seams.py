"""Canaries: every private TRL / transformers / bitsandbytes detail in `trl_ica.seams`, run against the installed
packages. An upgrade that moves one fails here, with the seam and the versions in the message."""

import os

import pytest
import torch
from testing_utils import dpo_pairs, tiny_llama, tiny_llama_for

from trl_ica import seams

CPU = dict(report_to="none", use_cpu=True, bf16=False, save_strategy="no", max_length=128)


def where(seam: str) -> str:
    return f"seam {seam} with {seams.versions()}"


def test_a_seam_error_names_the_seam_and_the_installed_versions():
    import transformers
    import trl

    class NoLayers:
        pass

    with pytest.raises(seams.SeamError) as raised:
        seams.cache_key_values(NoLayers())
    message = str(raised.value)
    assert "`DynamicCache.layers[i].keys/.values`" in message
    assert f"trl {trl.__version__}" in message and f"transformers {transformers.__version__}" in message


@pytest.mark.parametrize("kind", ["shared_prefix_cache", "read_only_prefix_cache"])
def test_kv_cache_layers_are_read_and_a_shared_prefix_is_never_written(kind):
    model = tiny_llama()
    backbone = model.get_decoder()
    argument = seams.cache_argument(backbone)
    prefix, rest = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11], [12, 13, 14]])
    with torch.no_grad():
        prefix_cache = seams.full_cache()
        backbone(input_ids=prefix, use_cache=True, **{argument: prefix_cache})
        layers = seams.cache_key_values(prefix_cache)
        assert len(layers) == model.config.num_hidden_layers, where("cache_key_values")
        kv_heads, head_dim = (
            model.config.num_key_value_heads,
            model.config.hidden_size // model.config.num_attention_heads,
        )
        assert all(k.shape == v.shape == (1, kv_heads, 4, head_dim) for k, v in layers), where("cache_key_values")
        before = [(k.clone(), v.clone()) for k, v in layers]
        if kind == "shared_prefix_cache":
            cache = seams.shared_prefix_cache(layers, 2)
        else:
            cache = seams.read_only_prefix_cache(layers)
        positions = torch.arange(4, 7).expand(2, -1)
        mask = torch.ones(2, 7, dtype=torch.long)
        cached = backbone(
            input_ids=rest, position_ids=positions, attention_mask=mask, use_cache=True, **{argument: cache}
        )
        full = backbone(input_ids=torch.cat([prefix.expand(2, -1), rest], 1)).last_hidden_state[:, 4:]
    # The same float32 computation in two groupings: differences are rounding, a few ulps of values of order 1
    tolerance = 64 * torch.finfo(torch.float32).eps * float(full.abs().max())
    assert torch.allclose(cached.last_hidden_state, full, atol=tolerance, rtol=0), where(kind)
    for (k, v), (k0, v0) in zip(layers, before):
        assert torch.equal(k, k0) and torch.equal(v, v0), where(f"{kind} (the prefix was written)")
    kept = seams.cache_key_values(cache)
    if kind == "read_only_prefix_cache":  # after the forward it still holds the one batch-1 prefix, nothing more
        assert all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(kept, layers)), where(kind)
    else:  # grows for generation
        assert all(k.shape[0] == 2 and k.shape[-2] == 7 for k, _ in kept), where(kind)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_attention_function_is_wrapped_and_restored(implementation):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama(attn_implementation=implementation)
    layers = seams.decoder_layers(model.get_decoder())
    assert len(layers) == model.config.num_hidden_layers, where("decoder_layers")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    calls = []

    def wrap(original):
        def attention(module, *args, **kwargs):
            calls.append(module)
            return original(module, *args, **kwargs)

        return attention

    mapping = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with torch.no_grad(), seams.attention_wrapped(layers[0].self_attn, wrap):
        logits = model(ids).logits
    assert calls == [layer.self_attn for layer in layers], where("attention_wrapped (the wrapper was not called)")
    assert torch.equal(logits, expected), where("attention_wrapped (the wrapped function changed the output)")
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == mapping, where("attention_wrapped (not restored)")


def test_where_a_model_was_loaded_from(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    config = AutoModelForCausalLM.from_pretrained(tmp_path).config
    assert seams.loaded_from(config) == str(tmp_path), where("loaded_from")
    with seams.reported_as(config, "org/base"):
        assert seams.loaded_from(config) == "org/base"
    assert seams.loaded_from(config) == str(tmp_path), where("reported_as (not restored)")


def test_a_whole_model_loads_while_a_zero3_config_is_registered(tmp_path):
    """A scoring model loads whole on each process under DeepSpeed ZeRO-3's registered config, which is restored."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    class Zero3:
        def is_zero3(self):
            return True

    tiny_llama().save_pretrained(tmp_path)
    registered = Zero3()
    set_hf_deepspeed_config(registered)
    try:
        with seams.whole_model_loading():
            assert not is_deepspeed_zero3_enabled(), where("whole_model_loading")
            AutoModelForCausalLM.from_pretrained(tmp_path)  # would need DeepSpeed to partition it
        assert is_deepspeed_zero3_enabled(), where("whole_model_loading (not restored)")
    finally:
        unset_hf_deepspeed_config()
    with seams.whole_model_loading():  # nothing registered: nothing to do
        assert not is_deepspeed_zero3_enabled()


def test_bitsandbytes_4bit_layers_are_recognised():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4")
    assert seams.repacks_in_eval(layer), where("repacks_in_eval: `Linear4bit.support_avx512bf16_for_cpu` is gone")
    assert not seams.repacks_in_eval(torch.nn.Linear(16, 16))


def test_the_trainer_methods_the_ica_trainers_override_exist():
    assert seams.trainer_methods_missing() == [], where("trainer_methods_missing")


def test_trl_fused_head_output_fields():
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_llama()
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        add_fused_lm_head(model, outputs=("log_probs", "log_sum_sq_probs"))
        kwargs = dict(input_ids=ids, labels=labels, fused_lm_head=True)
        output = model(**kwargs)
    log_probs = seams.fused_log_probs(kwargs, output)
    assert log_probs is not None and log_probs.shape == (2, 4), where("fused_log_probs")
    mask = labels[:, 1:] != -100
    # One LM head, two reductions (TRL's tiled kernel, log_softmax): rounding of a log-sum-exp over 128 entries
    tolerance = 128 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert torch.allclose(log_probs[mask], expected[mask], atol=tolerance, rtol=0), where("fused_log_probs")
    assert torch.all(log_probs[~mask] == 0), where("fused_log_probs (masked positions are not zero)")
    label_mask, lssp = seams.dpo_weighting_fields(output, wpo=True)
    assert torch.equal(label_mask, mask) and lssp.shape == log_probs.shape, where("dpo_weighting_fields")
    assert seams.fused_log_probs({"input_ids": ids}, output) is None


def test_trl_trainer_state_seams(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_list([{"prompt": f"What is {i}?", "completion": f" {i}."} for i in range(4)])
    trainer = SFTTrainer(
        tiny_llama_for(tokenizer), args=SFTConfig(str(tmp_path), **CPU), train_dataset=rows, processing_class=tokenizer
    )
    trainer._set_signature_columns_if_needed()
    seams.add_signature_column(trainer, "ica_index")
    assert "ica_index" in trainer._signature_columns and "input_ids" in trainer._signature_columns
    assert seams.checkpoint_folder(trainer, None) == os.path.join(str(tmp_path), "checkpoint-0"), where(
        "checkpoint_folder"
    )
    seams.train_metrics(trainer)["ica/weight_mean"].append(0.5)
    trainer.log({"loss": 1.0})  # TRL averages its metric lists into the logged record
    assert trainer.state.log_history[-1].get("ica/weight_mean") == 0.5, where("train_metrics")
    assert seams.histogram_writers(trainer) == ([], []), where("histogram_writers")
    assert seams.training_chat_template(trainer) in (None, trainer.processing_class.chat_template)


def test_trl_dpo_loss_terms(tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    train, _ = dpo_pairs(4)
    args = DPOConfig(str(tmp_path), **CPU, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    model, reference = tiny_llama_for(tokenizer), tiny_llama_for(tokenizer)
    trainer = DPOTrainer(model, reference, args=args, train_dataset=train, processing_class=tokenizer)
    assert (trainer.loss_types, trainer.loss_weights, trainer.use_weighting) == (["sigmoid", "sft"], [1.0, 0.5], False)
    with seams.dpo_loss_terms(trainer, ["sigmoid"], [1.0], True):
        assert (trainer.loss_types, trainer.loss_weights, trainer.use_weighting) == (["sigmoid"], [1.0], True)
    assert (trainer.loss_types, trainer.loss_weights, trainer.use_weighting) == (["sigmoid", "sft"], [1.0, 0.5], False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_trl_dpo_pair_factor(tokenizer, tmp_path, loss_type):
    """`dpo_set_pair_factor` makes TRL's DPO loss `mean_i(w_i * loss_i)`: unit weights give the stock loss exactly,
    and the loss is the weights' combination of each pair's own loss (a one-hot weight gives it), with a backward
    that works for the hinge loss too."""
    from trl import DPOConfig, DPOTrainer

    train, _ = dpo_pairs(3)
    args = DPOConfig(str(tmp_path), **CPU, loss_type=[loss_type])
    trainer = DPOTrainer(
        tiny_llama_for(tokenizer),
        tiny_llama_for(tokenizer),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.model.train()

    def loss_with(weights):
        def hook(module, args, kwargs, output):
            log_probs = seams.fused_log_probs(kwargs, output)
            if log_probs is not None:
                seams.dpo_set_pair_factor(output, log_probs, torch.tensor(weights), wpo=False)
                return output

        handle = model.register_forward_hook(hook, with_kwargs=True)
        try:
            with seams.dpo_loss_terms(trainer, [loss_type], [1.0], use_weighting=True):
                loss = trainer.compute_loss(model, dict(batch))
        finally:
            handle.remove()
        loss.backward()
        model.zero_grad()
        return loss.item()

    assert loss_with([1.0, 1.0, 1.0]) == trainer.compute_loss(model, dict(batch)).item(), where("dpo_set_pair_factor")
    parts = [loss_with(one_hot) for one_hot in torch.eye(3).tolist()]
    weights = [0.2, 0.0, 1.3]
    expected = sum(w * part for w, part in zip(weights, parts))
    # float32: each pair's factor exp(mean(log w)) is w up to a few ulp, and the sums are of three terms
    assert loss_with(weights) == pytest.approx(expected, rel=16 * torch.finfo(torch.float32).eps), where(
        "dpo_set_pair_factor"
    )


def test_trl_cpo_forward_and_labels(tokenizer, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    train, _ = dpo_pairs(4)
    args = CPOConfig(str(tmp_path), **CPU, per_device_train_batch_size=2)
    trainer = CPOTrainer(tiny_llama_for(tokenizer), args=args, train_dataset=train, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = seams.cpo_labels(trainer, batch, torch.device("cpu"))
    assert labels.shape[0] == 4 and labels.dtype == torch.long, where("cpo_labels")
    chosen, rejected, chosen_logits, rejected_logits, nll, rest = seams.cpo_forward_outputs(
        trainer.concatenated_forward(trainer.model, batch)
    )
    assert chosen.shape == rejected.shape == (2,) and nll.ndim == 0, where("cpo_forward_outputs")
    assert chosen_logits.shape[:2] == (2, labels.shape[1]), where("cpo_forward_outputs")
