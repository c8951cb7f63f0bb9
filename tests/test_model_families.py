"""The engine's log-probabilities equal each model's own forward (log-softmax of its logits) for every family with
its own logit post-processing: logit scale (Cohere), logits scaling (Granite), soft-capping (Gemma 2/3), and plain
heads (Llama, Qwen2/3, Mistral, Phi-3, OLMo2), with and without a shared prefix; and for every attention layout:
sliding windows shorter than the shared prefix (Gemma 2/3's alternating layers, windowed Mistral, Qwen2 and Phi-3)
and hybrid models whose recurrent layers cannot share a cache (Qwen3-Next), which are scored without sharing."""

import numpy as np
import pytest
import torch
import transformers
from reference import naive_log_prob

from trl_ica import seams
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.planner import LogProbRequest
from trl_ica.seams import logit_transform

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# float32 rounding (eps 1.2e-7) of logits up to ~100 in size (the head is scaled by 20 below), over a few ops and up
# to 4 summed tokens, computed in two orders: at most ~1e-4. The errors guarded against are 1e-3 (a window misapplied)
# to 0.4 (a window's cut cache read as the whole prefix).
TOLERANCE = 1e-4
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    # Sliding windows (8) shorter than the shared prefix (30): a window's cache is not the prefix's length
    "gemma2-window": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 8}),
    "gemma3-window": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 8, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "mistral-window-eager": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8, "attn": "eager"}),
    "qwen2-window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1},
    ),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 8}),
    # A linear-attention layer (recurrent state, no per-position cache) beside a full-attention one
    "qwen3next-hybrid": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            "head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_value_heads": 2,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
        },
    ),
}
WINDOWED = [family for family in FAMILIES if family.endswith(("-window", "-window-eager", "-hybrid"))]


def build(family):
    config_name, model_name, extra = FAMILIES[family]
    extra = dict(extra)
    attn = extra.pop("attn", None)
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**SMALL, **extra)
    if attn is not None:
        config._attn_implementation = attn
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # large enough weights that scaling and capping change the log-probabilities
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in WINDOWED])
def test_engine_log_probs_equal_the_models_own_forward(family):
    model = build(family)
    prefix = (1, 5, 9, 13, 17)
    requests = [LogProbRequest(prefix, (20 + i, 30 + i), (40 + i, 41, 42 + 2 * i)) for i in range(3)]
    requests += [LogProbRequest((), (1, 7 + i, 8), (50 + i, 51)) for i in range(2)]  # no shared prefix
    fused = score_requests(model, requests, show_progress=False).sums
    naive = np.array([naive_log_prob(model, r) for r in requests])
    np.testing.assert_allclose(fused, naive, rtol=0, atol=TOLERANCE)
    # the post-processing was not a no-op on these weights: without it the log-probabilities differ
    scale, softcap = logit_transform(model.config)
    if scale != 1.0 or softcap is not None:
        with torch.no_grad():
            raw = model.get_output_embeddings()(torch.randn(4, SMALL["hidden_size"]))
            done = raw * scale if softcap is None else torch.tanh(raw * scale / softcap) * softcap
            assert not torch.allclose(raw.log_softmax(-1), done.log_softmax(-1), atol=1e-3)


@pytest.mark.parametrize("family", WINDOWED)
@pytest.mark.parametrize("sharing", ["tree", "flat"])
def test_sliding_window_and_hybrid_models_score_exactly_past_the_window(family, sharing):
    """Prefixes of 30 and 12 tokens (the longer one extending the shorter, so the tree runs a piece after its
    parent) against windows of 8: every response scores as the model's own forward of the whole sequence."""
    model = build(family)
    kinds = seams.attention_layer_types(model.config)
    assert ("sliding_attention" in kinds) != family.endswith("-hybrid")
    long, short = tuple(range(3, 33)), tuple(range(3, 15))
    requests = [LogProbRequest(long, (40 + i, 50)[: i + 1], (60 + i, 61, 62, 63)[: 4 - i]) for i in range(3)]
    requests += [LogProbRequest(short, (40 + i,), (60 + i, 61)) for i in range(2)]
    requests += [LogProbRequest((), (1, 7 + i, 8), (50 + i, 51)) for i in range(2)]
    fused = score_requests(model, requests, show_progress=False, sharing=sharing).sums
    naive = np.array([naive_log_prob(model, r) for r in requests])
    np.testing.assert_allclose(fused, naive, rtol=0, atol=TOLERANCE)
