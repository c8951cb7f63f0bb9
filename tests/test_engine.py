import contextlib
import random

import numpy as np
import pytest
import torch
from reference import naive_log_prob, naive_token_log_probs
from testing_utils import LOGP_ATOL, REGROUPED_ATOL, TOKEN_LOGP_ATOL, tiny_llama

from trl_ica.scoring.engine import ScoringBudget, _ForwardRunner, score_requests
from trl_ica.scoring.planner import LogProbRequest, choose_sharing, plan_prefixes, sharing_costs, token_counts


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
    np.testing.assert_allclose(fused.sums, naive, atol=LOGP_ATOL, rtol=0)
    assert fused.sums.dtype == np.float64
    assert fused.counts.tolist() == [len(r.response) for r in requests]


@pytest.mark.parametrize("sharing", ["tree", "flat", "none"])
def test_per_token_log_probs_equal_naive(llama, sharing):
    requests = random_requests()
    fused = score_requests(llama, requests, batch_size=3, sharing=sharing, per_token=True, show_progress=False)
    assert len(fused.tokens) == len(requests)
    for request, tokens, total in zip(requests, fused.tokens, fused.sums):
        assert tokens.dtype == np.float32 and tokens.shape == (len(request.response),)
        np.testing.assert_allclose(tokens, naive_token_log_probs(llama, request), atol=TOKEN_LOGP_ATOL, rtol=0)
        np.testing.assert_allclose(tokens.astype(np.float64).sum(), total, atol=LOGP_ATOL, rtol=0)
    assert score_requests(llama, requests, show_progress=False).tokens is None


@pytest.mark.parametrize("sharing", ["tree", "flat", "none"])
def test_only_the_scored_positions_of_a_response_are_scored(llama, sharing):
    """A response whose `scored` positions leave some tokens out (a tool's result between assistant turns): those
    tokens are read as context, and the sums and token log-probs are the naive ones at the scored positions."""
    rng = random.Random(1)
    requests = [
        LogProbRequest(
            r.prefix,
            r.context,
            r.response,
            tuple(sorted(rng.sample(range(len(r.response)), rng.randint(1, len(r.response))))),
        )
        for r in random_requests()
    ]
    assert any(r.num_scored < len(r.response) for r in requests)
    fused = score_requests(llama, requests, batch_size=3, sharing=sharing, per_token=True, show_progress=False)
    assert fused.counts.tolist() == [len(r.scored) for r in requests]
    for request, tokens, total in zip(requests, fused.tokens, fused.sums):
        naive = np.array(naive_token_log_probs(llama, request))[list(request.scored)]
        np.testing.assert_allclose(tokens, naive, atol=TOKEN_LOGP_ATOL, rtol=0)
        np.testing.assert_allclose(total, naive.sum(), atol=LOGP_ATOL, rtol=0)


def test_results_follow_caller_order(llama):
    requests = random_requests()
    order = np.random.default_rng(0).permutation(len(requests))
    base = score_requests(llama, requests, show_progress=False).sums
    shuffled = score_requests(llama, [requests[i] for i in order], show_progress=False).sums
    np.testing.assert_allclose(shuffled, base[order], atol=REGROUPED_ATOL)


def test_empty_request_list(llama):
    out = score_requests(llama, [], show_progress=False)
    assert out.sums.shape == (0,) and out.counts.shape == (0,)


def test_request_validation():
    with pytest.raises(ValueError, match="response is empty"):
        LogProbRequest((1,), (2,), ())
    with pytest.raises(ValueError, match="at least one prefix or context"):
        LogProbRequest((), (), (3,))
    for scored in [(), (2,), (1, 0), (0, 0)]:
        with pytest.raises(ValueError, match=r"scored must be increasing positions of the 2 response tokens"):
            LogProbRequest((1,), (), (3, 4), scored)


def test_restores_mode_and_builds_no_graph(llama):
    llama.train()
    graphs = []  # whether each module call records an autograd graph (the parameters require grad)
    hooks = [
        m.register_forward_hook(lambda mod, args, out: graphs.append(torch.is_grad_enabled()))
        for m in (llama.model, llama.lm_head)
    ]
    out = score_requests(llama, random_requests(6), show_progress=False)
    for hook in hooks:
        hook.remove()
    assert graphs and not any(graphs)
    assert llama.training and all(m.training for m in llama.modules())
    assert np.isfinite(out.sums).all()


def test_halves_batch_on_out_of_memory(llama, monkeypatch):
    requests = random_requests()
    original = _ForwardRunner.score_batch
    seen = []

    def flaky(self, reqs, rows, state, per_token=False):
        seen.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, reqs, rows, state, per_token)

    monkeypatch.setattr(_ForwardRunner, "score_batch", flaky)
    budget = ScoringBudget()
    fused = score_requests(llama, requests, batch_size=8, max_batch_tokens=budget, show_progress=False)
    naive = np.array([naive_log_prob(llama, r) for r in requests])
    np.testing.assert_allclose(fused.sums, naive, atol=LOGP_ATOL)
    assert max(seen) > 2 and seen[-1] <= 2
    # The back-off holds for the rest of the budget's life: a later call starts at the reduced size
    assert budget.backed_off and budget.tokens < 2048
    seen.clear()
    score_requests(llama, requests, batch_size=8, max_batch_tokens=budget, show_progress=False)
    assert max(seen) <= 2


def test_other_errors_are_not_swallowed(llama, monkeypatch):
    def broken(self, reqs, rows, state, per_token=False):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(_ForwardRunner, "score_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        score_requests(llama, random_requests(4), show_progress=False)


def test_token_counts():
    shared = (1, 2, 3, 4)
    requests = [
        LogProbRequest(shared, (5,), (6, 7)),
        LogProbRequest(shared, (8, 9), (10,)),
        LogProbRequest((), (5,), (6,)),
    ]
    counts = token_counts(requests)
    assert counts.naive == 7 + 7 + 2
    assert counts.flat == (3 + 3 + 2) + 4  # continuations plus the shared prefix once
    assert counts.tree == counts.flat and counts.shared == 1 and counts.pieces == 1


def tree_requests(seed=0, vocab=128):
    """Prefixes shaped like kNN demonstrations: one opening, a first demo from a few, a second from a few more, then
    each request's own tail; some prefixes repeat, one is a proper start of others, some are empty."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi)))

    opening, firsts, seconds = ids(6, 6), [ids(5, 9) for _ in range(3)], [ids(1, 7) for _ in range(4)]
    prefixes = [opening + rng.choice(firsts) + rng.choice(seconds) + ids(0, 5) for _ in range(20)]
    prefixes += [prefixes[0], prefixes[3], opening + firsts[0], (), ()]
    return [LogProbRequest(p, ids(0 if p else 1, 6), ids(1, 6)) for p in prefixes]


def trie_tokens(prefixes) -> int:
    """Distinct prefix tokens: every position of the trie of `prefixes` counted once."""
    return len({p[:j] for p in prefixes for j in range(1, len(p) + 1)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_tree_runs_every_shared_token_once(seed):
    requests = tree_requests(seed)
    prefixes = [r.prefix for r in requests]
    continuations = sum(len(r.context) + len(r.response) for r in requests)
    for min_piece in (1, 4):
        plan = plan_prefixes(prefixes, min_piece=min_piece)
        assert plan.nodes == sorted(plan.nodes) and plan.nodes[0] == ()
        assert sorted(i for idx in plan.requests.values() for i in idx) == list(range(len(requests)))
        for node, idx in plan.requests.items():
            for i in idx:
                assert prefixes[i][: len(node)] == node
                if node:  # shared with another request
                    assert sum(p[: len(node)] == node for p in prefixes) >= 2
        remainder = sum(len(prefixes[i]) - len(node) for node, idx in plan.requests.items() for i in idx)
        run = plan.piece_tokens + remainder
        if min_piece == 1:
            assert run == trie_tokens(prefixes)  # the bound: each distinct prefix token once
        else:
            assert trie_tokens(prefixes) <= run < sum(map(len, prefixes))
    assert token_counts(requests).tree == continuations + plan.piece_tokens + remainder


@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("prefix_tree", [True, False])
def test_prefix_tree_scores_equal_naive_and_each_piece_runs_once(llama, monkeypatch, batch_size, prefix_tree):
    sharing = "tree" if prefix_tree else "flat"
    requests = tree_requests(3)
    pieces = []
    original = _ForwardRunner.prefix_state

    def spy(self, segment, parent=None):
        pieces.append(len(segment))
        return original(self, segment, parent)

    monkeypatch.setattr(_ForwardRunner, "prefix_state", spy)
    fused = score_requests(llama, requests, batch_size=batch_size, show_progress=False, sharing=sharing)
    naive = np.array([naive_log_prob(llama, r) for r in requests])
    np.testing.assert_allclose(fused.sums, naive, atol=LOGP_ATOL, rtol=0)
    if prefix_tree:
        plan = plan_prefixes([r.prefix for r in requests])
        assert sum(pieces) == plan.piece_tokens and len(pieces) == token_counts(requests).pieces > 3
    else:  # each prefix used twice or more, run whole from the start
        repeated = {r.prefix for r in requests if r.prefix and sum(q.prefix == r.prefix for q in requests) > 1}
        assert sorted(pieces) == sorted(len(p) for p in repeated) and len(repeated) == 2


def test_peft_adapter_is_active(llama):
    from peft import LoraConfig, get_peft_model

    requests = random_requests(10)
    before = score_requests(llama, requests, show_progress=False).sums
    peft_model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    after = score_requests(peft_model, requests, show_progress=False).sums
    naive = np.array([naive_log_prob(peft_model, r) for r in requests])
    np.testing.assert_allclose(after, naive, atol=LOGP_ATOL)
    assert np.abs(after - before).max() > 1e-3  # the adapter changed the numbers


def test_accelerate_wrapped_model(llama):
    from accelerate import Accelerator

    requests = random_requests(8)
    wrapped = Accelerator(cpu=True).prepare_model(llama)
    np.testing.assert_allclose(
        score_requests(wrapped, requests, show_progress=False).sums,
        score_requests(llama, requests, show_progress=False).sums,
        atol=1e-6,  # the same forward behind accelerate's wrapper: at most a few ulp of sums near 10
    )


def test_four_bit_model(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    layers = [m for m in quantized.modules() if "4bit" in type(m).__name__]
    assert layers
    # every forward dequantises: on an accelerator the planner charges it the heavier per-forward cost
    from trl_ica.scoring.models import heavy_forward
    from trl_ica.scoring.planner import default_overhead

    assert heavy_forward(quantized) and not heavy_forward(tiny_llama())
    assert default_overhead("cuda", True) > default_overhead("cuda", False) > default_overhead("cpu", True)
    requests = random_requests(8)
    fused = score_requests(quantized, requests, show_progress=False).sums
    # Scoring must not repack the 4-bit weights for CPU inference (that would break later training)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    quantized.train()  # the reference on the same (training-mode) kernel; the tiny model has no dropout
    naive = np.array([naive_log_prob(quantized, r) for r in requests])
    np.testing.assert_allclose(fused, naive, atol=LOGP_ATOL)


def regrouped_log_prob(model, request, beside) -> float:
    """[`naive_log_prob`] with the sequence right-padded in a batch beside a longer one: the same numbers in exact
    arithmetic, computed with other kernel shapes and so rounded differently."""
    ids = list(request.prefix + request.context + request.response)
    other = list(beside.prefix + beside.context + beside.response)
    pad = len(other) - len(ids)
    batch = torch.tensor([ids + [0] * pad, other])
    mask = torch.tensor([[1] * len(ids) + [0] * pad, [1] * len(other)])
    with torch.no_grad():
        logp = model(input_ids=batch, attention_mask=mask).logits[0].double().log_softmax(-1)
    start = len(request.prefix) + len(request.context)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


@pytest.mark.parametrize("how", ["bf16_weights", "fp32_weights_autocast"])
def test_bf16_scoring_equals_the_plain_bf16_forward(how):
    """The engine in bf16 (bf16 weights, or fp32 weights under autocast as mixed-precision training runs them)
    against one plain forward of each whole sequence in the same precision; and it really runs in bf16."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    if how == "bf16_weights":
        model = model.to(torch.bfloat16)
        compute, context = None, contextlib.nullcontext
    else:
        compute, context = torch.bfloat16, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    requests = tree_requests(5)
    fused = score_requests(model, requests, show_progress=False, compute_dtype=compute).sums
    assert set(seen) == {torch.bfloat16}
    with context():
        naive = np.array([naive_log_prob(model, r) for r in requests])
        # bf16 rounding on this machine, measured: the plain forward against itself regrouped
        longest = max(requests, key=lambda r: r.num_tokens)
        noise = max(abs(regrouped_log_prob(model, r, longest) - n) for r, n in zip(requests, naive))
    # the engine regroups the same sums (prefix caches, other batch shapes): its gap is of the size of that noise
    # (about 1x here), so a few times it bounds it; a rounding bound relative to the sum (eps x 166 nats) would let
    # through gaps 30 times the real ones
    tolerance = 4 * noise
    assert noise > 0 and (np.abs(fused - naive) <= tolerance).all(), (np.abs(fused - naive).max(), noise)


@pytest.mark.parametrize("sharing", ["tree", "flat", "none"])
def test_sharing_costs_count_the_forwards_and_tokens_the_engine_runs(llama, sharing):
    """The cost model's `(forwards, tokens)` for each way of sharing are those the engine then runs (backbone calls,
    and the positions they run, padding included), under a token budget small enough to split groups into several
    batches."""
    requests = tree_requests(7)
    calls, unpadded = [], []

    def count(module, args, kwargs, output):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        calls.append(ids.numel())
        unpadded.append(ids.numel() if mask is None else int(mask[:, -ids.shape[1] :].sum()))

    hook = llama.model.register_forward_hook(count, with_kwargs=True)
    score_requests(llama, requests, max_batch_tokens=64, sharing=sharing, show_progress=False)
    hook.remove()
    forwards, tokens = sharing_costs(requests, 64)[sharing]
    assert (len(calls), sum(calls)) == (forwards, tokens)
    assert sum(unpadded) < tokens  # these batches pad: a count of real tokens alone would be short


def test_choose_sharing_weighs_tokens_against_forwards():
    requests = tree_requests(7)
    costs = sharing_costs(requests, 64)
    assert costs["tree"][1] < costs["flat"][1] < costs["none"][1]  # sharing more runs fewer tokens
    assert costs["tree"][0] > costs["none"][0]  # in more forwards
    assert choose_sharing(requests, 64, None, overhead=0.0) == "tree"  # free forwards: fewest tokens
    assert choose_sharing(requests, 64, None, overhead=1e6) == min(costs, key=lambda k: costs[k][0])


def test_measured_forward_overhead_is_taken_once_per_model(llama, monkeypatch):
    from trl_ica.scoring import engine

    seen = []
    original = engine.measure_forward_overhead

    def spy(scorer, lockstep=None):
        seen.append(original(scorer, lockstep))
        return seen[-1]

    monkeypatch.setattr(engine, "measure_forward_overhead", spy)
    requests = tree_requests(2)
    fused = score_requests(llama, requests, show_progress=False, forward_overhead="measure").sums
    score_requests(llama, requests, show_progress=False, forward_overhead="measure")
    assert len(seen) == 2 and seen[0] == seen[1] > 0  # measured on the first call, remembered for the model
    with pytest.raises(ValueError, match="`forward_overhead` must be None, a number >= 0 or 'measure'"):
        score_requests(llama, requests, show_progress=False, forward_overhead=-1)
    naive = np.array([naive_log_prob(llama, r) for r in requests])
    np.testing.assert_allclose(fused, naive, atol=LOGP_ATOL, rtol=0)


def test_the_head_chunk_counts_the_vocabulary_of_a_partitioned_head():
    """DeepSpeed ZeRO-3 leaves each process an empty local weight; the vocabulary comes from the layer itself."""
    from trl_ica.scoring.models import head_rows

    head = torch.nn.Linear(8, 300, bias=False)
    assert head_rows(head) == 300
    head.weight = torch.nn.Parameter(torch.empty(0))
    head.weight.ds_shape = torch.Size([300, 8])
    assert head_rows(head) == 300
    del head.out_features
    assert head_rows(head) == 300  # from ZeRO-3's record of the full shape


def test_fsdp2_offloaded_parameters_compute_on_the_processs_device(llama, monkeypatch):
    """Under FSDP2 with CPU offload the shards rest on the CPU; the forward runs on the process's accelerator."""
    import accelerate

    import trl_ica.scoring.models as models

    assert models.execution_device(llama).type == "cpu"
    monkeypatch.setattr(models, "fsdp2_sharded", lambda model: True)
    monkeypatch.setattr(accelerate, "PartialState", lambda: type("State", (), {"device": torch.device("meta")})())
    assert models.execution_device(llama) == torch.device("meta")
