import random

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from reference import naive_log_prob

from trl_ica.scoring.engine import LogProbRequest, _Scorer, score_requests, token_counts


def random_requests(n=24, seed=0, vocab=128):
    rng = random.Random(seed)

    def ids(lo, hi):
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi)))

    prefixes = [ids(1, 30) for _ in range(3)]
    out = []
    for i in range(n):
        prefix = prefixes[i % 3] if i < n - 6 else ids(0, 12)  # shared groups, then singletons (some empty)
        context = ids(0 if prefix else 1, 10)
        out.append(LogProbRequest(prefix, context, ids(1, 12)))
    return out


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_fused_equals_naive(llama, batch_size):
    requests = random_requests()
    fused = score_requests(llama, requests, batch_size=batch_size, show_progress=False)
    naive = np.array([naive_log_prob(llama, r) for r in requests])
    np.testing.assert_allclose(fused.sums, naive, atol=1e-4, rtol=0)
    assert fused.sums.dtype == np.float64
    assert fused.counts.tolist() == [len(r.response) for r in requests]


def test_results_follow_caller_order(llama):
    requests = random_requests()
    order = np.random.default_rng(0).permutation(len(requests))
    base = score_requests(llama, requests, show_progress=False).sums
    shuffled = score_requests(llama, [requests[i] for i in order], show_progress=False).sums
    np.testing.assert_allclose(shuffled, base[order], atol=1e-5)


def test_empty_request_list(llama):
    out = score_requests(llama, [], show_progress=False)
    assert out.sums.shape == (0,) and out.counts.shape == (0,)


def test_request_validation():
    with pytest.raises(ValueError, match="response is empty"):
        LogProbRequest((1,), (2,), ())
    with pytest.raises(ValueError, match="at least one prefix or context"):
        LogProbRequest((), (), (3,))


def test_restores_mode_and_builds_no_graph(llama):
    llama.train()
    graphs = []  # whether each module call records an autograd graph (the parameters require grad)
    hooks = [m.register_forward_hook(lambda mod, args, out: graphs.append(torch.is_grad_enabled()))
             for m in (llama.model, llama.lm_head)]  # fmt: skip
    out = score_requests(llama, random_requests(6), show_progress=False)
    for hook in hooks:
        hook.remove()
    assert graphs and not any(graphs)
    assert llama.training and all(m.training for m in llama.modules())
    assert np.isfinite(out.sums).all()


def test_halves_batch_on_out_of_memory(llama, monkeypatch):
    requests = random_requests()
    original = _Scorer.score_batch
    seen = []

    def flaky(self, reqs, rows, state):
        seen.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, reqs, rows, state)

    monkeypatch.setattr(_Scorer, "score_batch", flaky)
    fused = score_requests(llama, requests, batch_size=8, show_progress=False)
    naive = np.array([naive_log_prob(llama, r) for r in requests])
    np.testing.assert_allclose(fused.sums, naive, atol=1e-4)
    assert max(seen) > 2 and seen[-1] <= 2


def test_other_errors_are_not_swallowed(llama, monkeypatch):
    def broken(self, reqs, rows, state):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(_Scorer, "score_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        score_requests(llama, random_requests(4), show_progress=False)


def test_token_counts():
    shared = (1, 2, 3, 4)
    requests = [
        LogProbRequest(shared, (5,), (6, 7)),
        LogProbRequest(shared, (8, 9), (10,)),
        LogProbRequest((), (5,), (6,)),
    ]
    naive, fused, groups = token_counts(requests)
    assert naive == 7 + 7 + 2
    assert fused == (3 + 3 + 2) + 4  # continuations plus the shared prefix once
    assert groups == 1


def test_peft_adapter_is_active(llama):
    from peft import LoraConfig, get_peft_model

    requests = random_requests(10)
    before = score_requests(llama, requests, show_progress=False).sums
    peft_model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    after = score_requests(peft_model, requests, show_progress=False).sums
    naive = np.array([naive_log_prob(peft_model, r) for r in requests])
    np.testing.assert_allclose(after, naive, atol=1e-4)
    assert np.abs(after - before).max() > 1e-3  # the adapter changed the numbers


def test_accelerate_wrapped_model(llama):
    from accelerate import Accelerator

    requests = random_requests(8)
    wrapped = Accelerator(cpu=True).prepare_model(llama)
    np.testing.assert_allclose(
        score_requests(wrapped, requests, show_progress=False).sums,
        score_requests(llama, requests, show_progress=False).sums,
        atol=1e-6,
    )


def test_four_bit_model(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    layers = [m for m in quantized.modules() if "4bit" in type(m).__name__]
    assert layers
    requests = random_requests(8)
    fused = score_requests(quantized, requests, show_progress=False).sums
    # Scoring must not repack the 4-bit weights for CPU inference (that would break later training)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    quantized.train()  # the reference on the same (training-mode) kernel; the tiny model has no dropout
    naive = np.array([naive_log_prob(quantized, r) for r in requests])
    np.testing.assert_allclose(fused, naive, atol=1e-4)
