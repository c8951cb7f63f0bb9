"""One-GPU check of the scoring engine at the sizes users run, on random-weight models built from configs (no Hub).

It needs torch, transformers, accelerate and peft only (trl and datasets are not imported), so it runs on a bare GPU
machine from a checkout (installed or not). What else a section uses (bitsandbytes for 4-bit, deepspeed for
ZeRO-3, flash-attn) is used where installed; `--wheels` downloads them here, for a machine that cannot reach a
package index:

    python scripts/gpu_check.py --wheels .whl      # here: the missing packages' wheels (about 50 MiB), sizes printed
    # on the GPU machine, about 7 minutes at most:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 scripts/gpu_check.py --output gpu_check.json
    python scripts/gpu_check.py --smoke --output smoke.json        # tiny shapes on the CPU: the script itself runs

Each section runs in a process of its own under a time guard (`--guard`), and all of them within `--budget` seconds
(450 by default), so a section that hangs, runs out of memory or crashes is recorded and the others still run; the
report (one JSON file, rewritten whole after each section) holds each section's figures, its `error`, or the reason it
was `skipped`. Every comparison of the engine with a plain forward reports the gap beside the plain forward's own
regrouping noise (the same sequence right-padded beside a longer one), and fails when the gap exceeds
`TOLERANCE_FACTOR` times that noise (floored at float32's rounding of the sum). The exit status is non-zero when a
section failed or erred.

Sections:

- `precision`: a 1B-shaped Llama in bf16 weights and in float32 weights under bf16 autocast, each against the plain
  forward of the same precision, and the dtype its layers ran in.
- `attention_sdpa`, `attention_eager`, `attention_flex`, `attention_fa2`: each attention implementation in bf16
  with forced `tree`, `flat` and `none` sharing, on a model with a sliding layer (window shorter than the shared
  prefix) and a full one, continuations of 1 to 200 tokens padded in batches.
- `memory_8b`: an 8B-shaped Llama (bf16) scoring 16 continuations of a 3,000-token prefix: peak memory against the
  weights, per token of the scoring budget.
- `planner`: each sharing mode's measured throughput against the mode the cost model picks, at 1B and 8B shapes in
  bf16 and (with bitsandbytes) 1B in 4-bit; the measured per-forward cost is the value to give
  `ica_scoring_overhead` (`--forward-overhead`) on such a GPU.
- `qlora`: a 4-bit (nf4) base with a LoRA adapter against its plain forward (bitsandbytes).
- `fsdp2`: FSDP2 (`fully_shard`) at one process, with and without CPU offload, against the unsharded model.
- `zero3`: DeepSpeed ZeRO-3 at one process against the unsharded model (deepspeed).
- `device_map`: a model split between two GPUs (`device_map`), or between the GPU and the CPU on one GPU.
- `lora_step`: scoring, then a LoRA training step with gradient checkpointing, then scoring again.
- `online_memory`: peak memory across ten repeated scorings (an online run's steps), which must stay flat.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback

import torch

if importlib.util.find_spec("trl_ica") is None:  # run from a checkout that is not installed: the repository's root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The engine's gap to a plain forward may be this many times the plain forward's own regrouping noise.
TOLERANCE_FACTOR = 4
#: Packages a section needs beyond torch, transformers, accelerate and peft; `--wheels` fetches these.
OPTIONAL = {"bitsandbytes": "bitsandbytes", "deepspeed": "deepspeed", "flash_attn": "flash-attn"}


class Skip(Exception):
    """A section that cannot run here; its message is the reason recorded."""


def need(module: str, section: str) -> None:
    if importlib.util.find_spec(module) is None:
        how = "it builds per CUDA release" if module == "flash_attn" else "`--wheels DIR` downloads it"
        raise Skip(f"{section} needs {OPTIONAL[module]}, which is not installed ({how})")


def engine():
    from trl_ica.scoring import engine as module

    return module


def llama(shape: str, device, dtype, smoke: bool, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {
        "1b": dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
        "8b": dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
        "tiny": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        ),
    }
    config = LlamaConfig(**sizes["tiny" if smoke else shape], max_position_embeddings=8192, **extra)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def requests(rng, n, prefix_len, cont_lens, vocab, groups=1, shared_start=0):
    """`n` requests over `groups` prefixes of `prefix_len` tokens that share their first `shared_start` tokens;
    continuation lengths drawn from `cont_lens` (an int or a (low, high) range)."""
    from trl_ica.scoring.planner import LogProbRequest

    start = tuple(rng.randrange(3, vocab) for _ in range(shared_start))
    own = prefix_len - shared_start
    prefixes = [start + tuple(rng.randrange(3, vocab) for _ in range(own)) for _ in range(groups)]
    out = []
    for i in range(n):
        length = cont_lens if isinstance(cont_lens, int) else rng.randint(*cont_lens)
        context = tuple(rng.randrange(3, vocab) for _ in range(length // 2))
        response = tuple(rng.randrange(3, vocab) for _ in range(max(1, length - length // 2)))
        out.append(LogProbRequest(prefixes[i % groups], context, response))
    return out


@torch.no_grad()
def plain(model, request, beside=None) -> float:
    """The response's summed log-prob from one forward of the whole sequence; with `beside`, right-padded in a batch
    beside that longer sequence (the same sum, rounded differently)."""
    ids = list(request.prefix + request.context + request.response)
    rows, mask = [ids], [[1] * len(ids)]
    if beside is not None:
        other = list(beside.prefix + beside.context + beside.response)
        pad = max(0, len(other) - len(ids))
        rows, mask = (
            [ids + [0] * pad, other + [0] * max(0, len(ids) - len(other))],
            [[1] * len(ids) + [0] * pad, [1] * len(other) + [0] * max(0, len(ids) - len(other))],
        )
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    ids_t, mask_t = torch.tensor(rows, device=device), torch.tensor(mask, device=device)
    logp = model(input_ids=ids_t, attention_mask=mask_t).logits[0].double().log_softmax(-1)
    start = len(request.prefix) + len(request.context)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def compare(model, reqs, fused, context=contextlib.nullcontext) -> dict:
    """The engine's sums `fused` against the plain forward of each sequence, beside that forward's regrouping noise."""
    with context():
        naive = [plain(model, r) for r in reqs]
        longest = max(reqs, key=lambda r: r.num_tokens)
        noise = max(abs(plain(model, r, longest) - n) for r, n in zip(reqs, naive) if r is not longest)
    return judged(max(abs(float(a) - b) for a, b in zip(fused, naive)), noise, reqs)


def judged(gap: float, noise: float, reqs) -> dict:
    """A gap to the reference beside the regrouping noise it is judged by (floored at float32's rounding of a sum of
    the longest request's terms, about 1e-6 each)."""
    floor = 1e-6 * max(r.num_tokens for r in reqs)
    return {"largest_gap": gap, "regrouping_noise": noise, "ok": gap <= TOLERANCE_FACTOR * max(noise, floor)}


def synced():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_reset():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def section_precision(device, smoke):
    score_requests = engine().score_requests
    model = llama("1b", device, torch.float32, smoke)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # sharper distributions: log-probs far from uniform, as a trained model's
    reqs = requests(
        random.Random(0),
        16 if not smoke else 6,
        512 if not smoke else 24,
        (1, 200) if not smoke else (1, 12),
        model.config.vocab_size,
    )
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(str(out.dtype)))
    out = {}
    for name in ("float32", "bf16_weights", "bf16_autocast"):
        model.to(torch.bfloat16 if name == "bf16_weights" else torch.float32)
        compute = torch.bfloat16 if name == "bf16_autocast" else None
        score_requests(model, reqs[:2], show_progress=False, compute_dtype=compute)  # warm-up
        seen.clear()
        start = synced()
        sums = score_requests(model, reqs, show_progress=False, compute_dtype=compute).sums
        seconds = synced() - start
        dtypes = sorted(set(seen))
        context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if compute else contextlib.nullcontext
        out[name] = {"seconds": seconds, "dtypes": dtypes, **compare(model, reqs, sums, context)}
        expected = "torch.float32" if name == "float32" else "torch.bfloat16"
        out[name]["ok"] = out[name]["ok"] and dtypes == [expected]
    return out


def mixed_window_model(implementation, device, dtype, smoke):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
        sliding_window=64 if not smoke else 16,
        use_sliding_window=True,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        attn_implementation=implementation,
    )
    torch.manual_seed(1)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype).eval()


def attention(implementation: str):
    """The section comparing the engine with a plain forward under one attention implementation, in bf16 (float32 in
    `--smoke`), with each sharing mode forced."""

    def section(device, smoke):
        dtype = torch.float32 if smoke else torch.bfloat16
        if implementation == "flash_attention_2":
            need("flash_attn", "flash_attention_2")
            if device.type != "cuda":
                raise Skip("flash_attention_2 runs on CUDA only")
        if implementation == "flex_attention" and smoke:
            raise Skip("--smoke: flex_attention compiles for about a minute on a CPU")
        model = mixed_window_model(implementation, device, dtype, smoke)
        # a shared start longer than the window, then per-group prefixes; continuations of 1-200 tokens
        reqs = requests(
            random.Random(1),
            12,
            200 if not smoke else 40,
            (1, 200) if not smoke else (1, 20),
            1024,
            groups=3,
            shared_start=100 if not smoke else 24,
        )
        out = {"dtype": str(dtype)}
        for sharing in ("tree", "flat", "none"):
            sums = engine().score_requests(model, reqs, show_progress=False, sharing=sharing, batch_size=4).sums
            out[sharing] = compare(model, reqs, sums)
        return out

    return section


def section_memory_8b(device, smoke):
    module = engine()
    model = llama("8b", device, torch.bfloat16, smoke)
    weights = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    reqs = requests(random.Random(2), 16, 3000 if not smoke else 60, 256 if not smoke else 8, model.config.vocab_size)
    budget = module.ScoringBudget().resolve(device)
    peak_reset()
    start = synced()
    module.score_requests(model, reqs, show_progress=False)
    peak = peak_gib()
    out = {
        "weights_gib": weights,
        "peak_gib": peak,
        "seconds": synced() - start,
        "requests": len(reqs),
        "budget_tokens": budget,
    }
    if peak is not None:
        out["activation_gib_per_1k_budget_tokens"] = (peak - weights) / budget * 1000
    return out


def knn_shaped(rng, vocab, smoke):
    """Prefixes shaped like kNN demonstrations: a common opening, one of a few first demonstrations, own tails."""
    from trl_ica.scoring.planner import LogProbRequest

    opening = tuple(rng.randrange(3, vocab) for _ in range(32))
    firsts = [tuple(rng.randrange(3, vocab) for _ in range(300 if not smoke else 20)) for _ in range(8)]
    reqs = []
    for _ in range(192 if not smoke else 12):
        tail = tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(0, 400 if not smoke else 20)))
        cont = tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(2, 128 if not smoke else 8)))
        half = len(cont) // 2
        reqs.append(LogProbRequest(opening + rng.choice(firsts) + tail, cont[:half], cont[half:]))
    return reqs


def quantized_llama(shape, device, smoke):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as folder:
        llama(shape, "cpu" if smoke else device, torch.bfloat16, smoke).save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"
            ),
            device_map={"": device} if device.type == "cuda" else None,
        ).eval()


def section_planner(device, smoke):
    module = engine()
    from trl_ica.scoring.models import heavy_forward
    from trl_ica.scoring.planner import choose_sharing, default_overhead, sharing_costs

    out = {}
    for name in ("1b_bf16", "8b_bf16", "1b_4bit"):
        try:
            shape, kind = name.split("_")
            if kind == "4bit":
                need("bitsandbytes", "4-bit")
                model = quantized_llama(shape, device, smoke)
            else:
                model = llama(shape, device, torch.bfloat16, smoke)
            reqs = knn_shaped(random.Random(3), model.config.vocab_size, smoke)
            tokens = module.ScoringBudget().resolve(device)
            with torch.no_grad():
                overhead = module.measure_forward_overhead(module._ForwardRunner(model, device))
            default = default_overhead(device.type, heavy_forward(model))
            row = {
                "measured_overhead_tokens": overhead,
                "default_overhead_tokens": default,
                "costs": sharing_costs(reqs, tokens),
            }
            speed = {}
            for mode in ("tree", "flat", "none"):
                module.score_requests(model, reqs[:4], show_progress=False, sharing=mode)  # warm-up
                start = synced()
                module.score_requests(model, reqs, show_progress=False, sharing=mode)
                speed[mode] = len(reqs) / (synced() - start)
            row["requests_per_second"] = speed
            row["fastest"] = max(speed, key=speed.get)
            row["chosen_with_default"] = choose_sharing(reqs, tokens, None, default)
            row["chosen_with_measured"] = choose_sharing(reqs, tokens, None, overhead)
            # how much slower the planner's pick is than the fastest mode, with each per-forward cost
            row["default_pick_slowdown"] = speed[row["fastest"]] / speed[row["chosen_with_default"]]
            row["measured_pick_slowdown"] = speed[row["fastest"]] / speed[row["chosen_with_measured"]]
            out[name] = row
            del model
            peak_reset()
        except Skip as reason:
            out[name] = {"skipped": str(reason)}
    measured = [r["measured_overhead_tokens"] for r in out.values() if "measured_overhead_tokens" in r]
    if measured:
        out["suggested_ica_scoring_overhead"] = round(max(measured))
    return out


def section_qlora(device, smoke):
    need("bitsandbytes", "qlora")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        quantized_llama("1b", device, smoke), LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)
    )
    reqs = requests(
        random.Random(4), 16, 256 if not smoke else 20, (1, 64) if not smoke else (1, 6), model.config.vocab_size
    )
    start = synced()
    fused = engine().score_requests(model, reqs, show_progress=False).sums
    seconds = synced() - start
    from trl_ica.scoring.models import eval_mode

    # the reference in the engine's own mode: an eval-mode forward of a 4-bit layer runs another kernel on CPUs with
    # AVX512-BF16 (weights repacked for inference), whose bf16 rounding differs from the training-mode one by ~5e-3
    return {"seconds": seconds, **compare(model, reqs, fused, context=lambda: eval_mode(model))}


def one_process_group(device):
    """A process group of one (NCCL on a GPU, gloo on the CPU), for the sharded placements."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def section_fsdp2(device, smoke):
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    except ImportError as error:
        raise Skip(f"this torch has no FSDP2 ({error})") from error
    from torch.distributed.device_mesh import init_device_mesh

    one_process_group(device)
    dtype = torch.float32 if smoke else torch.bfloat16
    reference = llama("1b", device, dtype, smoke)
    reqs = requests(
        random.Random(6),
        12,
        256 if not smoke else 20,
        (1, 64) if not smoke else (1, 8),
        reference.config.vocab_size,
        groups=3,
    )
    expected = engine().score_requests(reference, reqs, show_progress=False).sums
    noise = compare(reference, reqs, expected)["regrouping_noise"]
    out = {}
    for offload in (False, True):
        if offload and device.type != "cuda":
            out["cpu_offload"] = {"skipped": "CPU offload pins host memory for an accelerator"}
            continue
        model = llama("1b", device, dtype, smoke)
        mesh = init_device_mesh(device.type, (1,))
        policy = {"offload_policy": CPUOffloadPolicy()} if offload else {}
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, **policy)
        fully_shard(model, mesh=mesh, **policy)
        sums = engine().score_requests(model, reqs, show_progress=False).sums
        out["cpu_offload" if offload else "plain"] = judged(float(abs(sums - expected).max()), noise, reqs)
        del model
    return out


def section_zero3(device, smoke):
    need("deepspeed", "zero3")
    import deepspeed

    one_process_group(device)
    reference = llama("1b", device, torch.bfloat16 if not smoke else torch.float32, smoke)
    reqs = requests(
        random.Random(7),
        8,
        128 if not smoke else 16,
        (1, 32) if not smoke else (1, 6),
        reference.config.vocab_size,
        groups=2,
    )
    expected = engine().score_requests(reference, reqs, show_progress=False).sums
    noise = compare(reference, reqs, expected)["regrouping_noise"]
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": not smoke}}
    model = llama("1b", device, reference.dtype, smoke)
    wrapped, *_ = deepspeed.initialize(model=model, config=config, model_parameters=None)
    sums = engine().score_requests(wrapped.module, reqs, show_progress=False).sums
    return judged(float(abs(sums - expected).max()), noise, reqs)


def section_device_map(device, smoke):
    if device.type != "cuda":
        raise Skip("device_map places a model across GPUs (the CPU tests cover cpu/meta offload maps)")
    from accelerate import dispatch_model

    gpus = torch.cuda.device_count()
    model = llama("1b", "cpu", torch.bfloat16, smoke)
    reqs = requests(random.Random(8), 12, 256, (1, 64), model.config.vocab_size, groups=3)
    half = model.config.num_hidden_layers // 2
    second = 1 if gpus > 1 else "cpu"
    placement = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.norm": second,
        "lm_head": second,
        **{f"model.layers.{i}": 0 if i < half else second for i in range(model.config.num_hidden_layers)},
    }
    reference = llama("1b", device, torch.bfloat16, smoke)
    expected = engine().score_requests(reference, reqs, show_progress=False).sums
    noise = compare(reference, reqs, expected)["regrouping_noise"]
    del reference
    split = dispatch_model(model, device_map=placement)
    sums = engine().score_requests(split, reqs, show_progress=False).sums
    return {"second_device": str(second), **judged(float(abs(sums - expected).max()), noise, reqs)}


def section_lora_step(device, smoke):
    from peft import LoraConfig, get_peft_model

    score_requests = engine().score_requests
    base = llama("1b", device, torch.bfloat16 if not smoke else torch.float32, smoke)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    reqs = requests(
        random.Random(9),
        8,
        128 if not smoke else 16,
        (4, 64) if not smoke else (2, 8),
        model.config.vocab_size,
        groups=2,
    )
    model.train()
    before = score_requests(model, reqs, show_progress=False).sums
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([list(reqs[0].prefix + reqs[0].context + reqs[0].response)] * 2, device=device)
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    after = score_requests(model, reqs, show_progress=False).sums
    moved = float(abs(after - before).max())
    finite = bool(torch.isfinite(torch.tensor(losses)).all())
    return {
        "losses": losses,
        "scores_moved": moved,
        "still_training_mode": model.training,
        "ok": model.training and finite and losses[1] < losses[0] and moved > 0,
    }


def section_online_memory(device, smoke):
    model = llama("1b", device, torch.bfloat16, smoke)
    reqs = requests(
        random.Random(5), 32, 512 if not smoke else 24, 128 if not smoke else 8, model.config.vocab_size, groups=4
    )
    peaks = []
    for _ in range(10):
        peak_reset()
        engine().score_requests(model, reqs, show_progress=False)
        peaks.append(peak_gib())
    flat = peaks[0] is None or max(peaks[1:]) <= peaks[1] * 1.01
    return {"peaks_gib": peaks, "ok": flat}


SECTIONS = {
    "precision": (section_precision, 45),
    "attention_sdpa": (attention("sdpa"), 30),
    "attention_eager": (attention("eager"), 30),
    "attention_flex": (attention("flex_attention"), 90),
    "attention_fa2": (attention("flash_attention_2"), 30),
    "memory_8b": (section_memory_8b, 45),
    "planner": (section_planner, 90),
    "qlora": (section_qlora, 30),
    "fsdp2": (section_fsdp2, 30),
    "zero3": (section_zero3, 30),
    "device_map": (section_device_map, 30),
    "lora_step": (section_lora_step, 20),
    "online_memory": (section_online_memory, 20),
}


def run_section(name: str, smoke: bool, path: str) -> None:
    """Run one section here and write its result to `path` (the child process of [`run_guarded`])."""
    device = torch.device("cpu" if smoke else "cuda")
    try:
        result = SECTIONS[name][0](device, smoke)
    except Skip as reason:
        result = {"skipped": str(reason)}
    except Exception as error:  # noqa: BLE001 - recorded in the report
        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def run_guarded(name: str, smoke: bool, guard: float) -> dict:
    """One section in a process of its own, cut at `guard` seconds (recorded as an error)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "section.json")
        python = [sys.executable, *(["-S"] if sys.flags.no_site else [])]  # the child sees the same packages
        command = [*python, os.path.abspath(__file__), "--run-section", name, "--section-output", path]
        try:
            done = subprocess.run(
                command + (["--smoke"] if smoke else []), capture_output=True, text=True, timeout=guard
            )
        except subprocess.TimeoutExpired:
            return {"error": f"time guard: cut after {guard:.0f} s"}
        if not os.path.isfile(path):
            return {
                "error": f"the section's process ended with status {done.returncode} and no result",
                "output": (done.stdout + done.stderr)[-2000:],
            }
        with open(path) as f:
            return json.load(f)


def failed(section: dict) -> bool:
    """An error anywhere in the section, or a comparison marked not ok."""
    if "error" in section or section.get("ok") is False:
        return True
    return any(failed(value) for value in section.values() if isinstance(value, dict))


def download_wheels(folder: str) -> None:
    """The wheels of the optional packages (and what they need beyond the GPU image: deepspeed's hjson and pydantic)
    for CPython 3.12 on x86-64 Linux, to `folder`, with their sizes. flash-attn is left out: its wheels are built per
    CUDA and torch release and weigh hundreds of MB."""
    platforms = [
        f"--platform={p}"
        for p in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_24_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux1_x86_64",
            "any",
        )
    ]
    target = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", folder]
    pip = [sys.executable, "-m", "pip"]
    os.makedirs(folder, exist_ok=True)
    subprocess.run([*pip, "download", "--no-deps", *target, "bitsandbytes"], check=True)
    subprocess.run([*pip, "download", *target, "hjson", "pydantic>=2"], check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", folder, "deepspeed"], check=True)  # pure Python; ops build there
    total = 0
    for name in sorted(os.listdir(folder)):
        size = os.path.getsize(os.path.join(folder, name))
        total += size
        print(f"{size / 2**20:8.1f} MiB  {name}")
    print(
        f"{total / 2**20:8.1f} MiB in all. On the GPU machine: python3 -m pip install -q --no-index --no-deps "
        f"--target /tmp/site {folder}/*.whl && PYTHONPATH=/tmp/site python3 scripts/gpu_check.py"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script itself runs")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument(
        "--guard", type=float, default=None, help="seconds each section may run (default: each section's own, 20-90 s)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=450,
        help="seconds all sections together may run; a section that no longer fits is skipped",
    )
    parser.add_argument("--wheels", metavar="DIR", help="download the optional packages' wheels to DIR and stop")
    parser.add_argument("--run-section", help=argparse.SUPPRESS)
    parser.add_argument("--section-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.wheels:
        download_wheels(args.wheels)
        return
    if args.run_section:
        run_section(args.run_section, args.smoke, args.section_output)
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; `--smoke` runs tiny shapes on the CPU instead.")
    import transformers

    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "installed": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL},
        "sections": {},
    }
    deadline = time.perf_counter() + args.budget
    for name in args.sections:
        guard = min(args.guard or SECTIONS[name][1] * (3 if args.smoke else 1), deadline - time.perf_counter())
        start = time.perf_counter()
        if guard < 5:
            section = {"skipped": f"the run's time budget (--budget {args.budget:.0f} s) was spent"}
        else:
            section = run_guarded(name, args.smoke, guard)
        report["sections"][name] = section
        section["section_seconds"] = time.perf_counter() - start
        print(name, json.dumps(section, default=str)[:400], flush=True)
        temporary = args.output + ".tmp"
        with open(temporary, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(temporary, args.output)
    bad = [name for name, section in report["sections"].items() if failed(section)]
    skipped = [name for name, section in report["sections"].items() if "skipped" in section]
    print(
        f"gpu_check.py: {len(report['sections']) - len(bad) - len(skipped)} passed, {len(bad)} failed {bad}, "
        f"{len(skipped)} skipped {skipped}; report in {args.output}"
    )
    if bad:
        raise SystemExit(f"gpu_check.py: sections {bad} failed; see {args.output}.")


if __name__ == "__main__":
    main()
