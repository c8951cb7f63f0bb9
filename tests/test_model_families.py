"""The engine's log-probabilities equal each model's own forward (log-softmax of its logits) for every family with
its own logit post-processing: logit scale (Cohere), logits scaling (Granite), soft-capping (Gemma 2/3), and plain
heads (Llama, Qwen2/3, Mistral, Phi-3, OLMo2), with and without a shared prefix."""

import numpy as np
import pytest
import torch
import transformers
from reference import naive_log_prob

from trl_ica.scoring.engine import LogProbRequest, logit_transform, score_requests

SMALL = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
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
}


def build(family):
    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**SMALL, **extra)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # large enough weights that scaling and capping change the log-probabilities
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_log_probs_equal_the_models_own_forward(family):
    model = build(family)
    prefix = (1, 5, 9, 13, 17)
    requests = [LogProbRequest(prefix, (20 + i, 30 + i), (40 + i, 41, 42 + 2 * i)) for i in range(3)]
    requests += [LogProbRequest((), (1, 7 + i, 8), (50 + i, 51)) for i in range(2)]  # no shared prefix
    fused = score_requests(model, requests, show_progress=False).sums
    naive = np.array([naive_log_prob(model, r) for r in requests])
    np.testing.assert_allclose(fused, naive, rtol=0, atol=1e-4)
    # the post-processing was not a no-op on these weights: without it the log-probabilities differ
    scale, softcap = logit_transform(model.config)
    if scale != 1.0 or softcap is not None:
        with torch.no_grad():
            raw = model.get_output_embeddings()(torch.randn(4, SMALL["hidden_size"]))
            done = raw * scale if softcap is None else torch.tanh(raw * scale / softcap) * softcap
            assert not torch.allclose(raw.log_softmax(-1), done.log_softmax(-1), atol=1e-3)
