"""One-GPU check of the scoring engine at the sizes users run, on random-weight models built from configs (no Hub).

    python scripts/gpu_check.py --output gpu_check.json          # one GPU, about 8 minutes at most
    python scripts/gpu_check.py --smoke --output smoke.json      # tiny shapes on the CPU: the script itself runs

Sections (each records its figures, or the error it met, in the JSON report; one failing section does not stop the
others):

- `precision`: a 1B-shaped Llama scoring the same requests with float32 weights, bf16 weights, and float32 weights
  under bf16 autocast: seconds, the dtype the layers ran in, and the largest gap to float32.
- `attention`: engine against a plain forward of each whole sequence, for sdpa, eager, flash_attention_2 and
  flex_attention where installed, on a model with a sliding window shorter than the shared prefix and a full layer.
- `memory_8b`: an 8B-shaped Llama (bf16) scoring 16 continuations of one 3,000-token prefix: peak memory against the
  weights, and against the budget's estimate.
- `planner`: tree, whole-prefix, no sharing and the cost model's choice (`auto`): throughput (requests per second)
  at 1B and 8B shapes on prefixes shaped like kNN demonstrations, with the measured per-forward overhead (in tokens)
  and each way's (forwards, tokens).
- `qlora`: a 4-bit (nf4) base with a LoRA adapter scoring like its plain forward, when bitsandbytes is installed.
- `online_memory`: peak memory across ten repeated scorings (an online run's steps), which must stay flat.
"""

import argparse
import contextlib
import json
import os
import random
import time
import traceback

import torch

from trl_ica.scoring.engine import ScoringBudget, _Scorer, measure_forward_overhead, score_requests
from trl_ica.scoring.planner import (
    ACCELERATOR_OVERHEAD,
    DEFAULT_OVERHEAD,
    LogProbRequest,
    choose_sharing,
    sharing_costs,
)


def llama(shape: str, device, dtype, smoke: bool, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {
        "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256),
        "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512),
    }  # fmt: skip
    config = LlamaConfig(**sizes["tiny" if smoke else shape], max_position_embeddings=8192, **extra)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def requests(rng, n, prefix_len, cont_len, vocab, groups=1, shared_start=0):
    """`n` requests over `groups` prefixes of `prefix_len` tokens that share their first `shared_start` tokens."""
    start = tuple(rng.randrange(3, vocab) for _ in range(shared_start))
    own = prefix_len - shared_start
    prefixes = [start + tuple(rng.randrange(3, vocab) for _ in range(own)) for _ in range(groups)]
    out = []
    for i in range(n):
        context = tuple(rng.randrange(3, vocab) for _ in range(cont_len // 2))
        response = tuple(rng.randrange(3, vocab) for _ in range(cont_len - cont_len // 2))
        out.append(LogProbRequest(prefixes[i % groups], context, response))
    return out


@torch.no_grad()
def plain(model, request) -> float:
    ids = torch.tensor([list(request.prefix + request.context + request.response)], device=model.device)
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(request.prefix) + len(request.context)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))


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
    model = llama("1b", device, torch.float32, smoke)
    vocab = model.config.vocab_size
    reqs = requests(random.Random(0), 32 if not smoke else 6, 512 if not smoke else 24, 128 if not smoke else 8, vocab)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(str(out.dtype)))
    out = {}
    reference = None
    for name in ("float32", "bf16_weights", "bf16_autocast"):
        model.to(torch.bfloat16 if name == "bf16_weights" else torch.float32)
        compute = torch.bfloat16 if name == "bf16_autocast" else None
        score_requests(model, reqs[:2], show_progress=False, compute_dtype=compute)  # warm-up
        seen.clear()
        start = synced()
        sums = score_requests(model, reqs, show_progress=False, compute_dtype=compute).sums
        seconds = synced() - start
        reference = sums if reference is None else reference
        gap = float(abs(sums - reference).max())
        out[name] = {"seconds": seconds, "dtypes": sorted(set(seen)), "largest_gap": gap}
    return out


def section_attention(device, smoke):
    from transformers import MistralConfig, MistralForCausalLM

    implementations = ["sdpa", "eager"]
    with contextlib.suppress(ImportError):
        import flash_attn  # noqa: F401

        implementations.append("flash_attention_2")
    implementations.append("flex_attention")
    out = {}
    for implementation in implementations:
        try:
            config = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=1024, sliding_window=64,
                                   max_position_embeddings=4096)  # fmt: skip
            config._attn_implementation = implementation
            dtype = torch.bfloat16 if implementation == "flash_attention_2" else torch.float32
            with torch.device(device):
                model = MistralForCausalLM(config).to(dtype).eval()
            reqs = requests(random.Random(1), 8, 200 if not smoke else 80, 24, 1024, groups=2, shared_start=40)
            fused = score_requests(model, reqs, show_progress=False).sums
            naive = [plain(model, r) for r in reqs]
            out[implementation] = {"largest_gap": float(max(abs(a - b) for a, b in zip(fused, naive))),
                                   "dtype": str(dtype)}  # fmt: skip
        except Exception as error:  # noqa: BLE001 - recorded, the other implementations still run
            out[implementation] = {"error": f"{type(error).__name__}: {error}"}
    return out


def section_memory_8b(device, smoke):
    model = llama("8b", device, torch.bfloat16, smoke)
    weights = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
    vocab = model.config.vocab_size
    reqs = requests(random.Random(2), 16, 3000 if not smoke else 60, 256 if not smoke else 8, vocab)
    peak_reset()
    start = synced()
    score_requests(model, reqs, show_progress=False)
    return {"weights_gib": weights, "peak_gib": peak_gib(), "seconds": synced() - start, "requests": len(reqs),
            "budget_tokens": ScoringBudget().resolve(device)}  # fmt: skip


def section_planner(device, smoke):
    out = {}
    for shape in ("1b", "8b"):
        model = llama(shape, device, torch.bfloat16, smoke)
        vocab = model.config.vocab_size
        # kNN-shaped prefixes: a common opening, then one of a few first demonstrations, then per-request tails
        rng = random.Random(3)
        opening = tuple(rng.randrange(3, vocab) for _ in range(32))
        firsts = [tuple(rng.randrange(3, vocab) for _ in range(300 if not smoke else 20)) for _ in range(8)]
        reqs = []
        for _ in range(256 if not smoke else 12):
            tail = tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(0, 400 if not smoke else 20)))
            cont = tuple(rng.randrange(3, vocab) for _ in range(64 if not smoke else 6))
            reqs.append(LogProbRequest(opening + rng.choice(firsts) + tail, cont[:32], cont[32:] or cont[:1]))
        row = {}
        for mode in ("tree", "flat", "none", "auto", "auto_measured"):
            options = {"sharing": mode[:4]} if mode.startswith("auto") else {"sharing": mode}
            if mode == "auto_measured":
                options["forward_overhead"] = "measure"
            score_requests(model, reqs[:4], show_progress=False, **options)  # warm-up (and the measurement)
            start = synced()
            score_requests(model, reqs, show_progress=False, **options)
            row[mode] = len(reqs) / (synced() - start)
        tokens = ScoringBudget().resolve(device)
        with torch.no_grad():
            overhead = measure_forward_overhead(_Scorer(model, device))
        row["overhead_tokens"] = overhead
        row["costs"] = sharing_costs(reqs, tokens)
        row["auto_measured_chose"] = choose_sharing(reqs, tokens, None, overhead)
        row["auto_chose"] = choose_sharing(reqs, tokens, None, DEFAULT_OVERHEAD.get(device.type, ACCELERATOR_OVERHEAD))
        out[shape] = row
        del model
        peak_reset()
    return out


def section_qlora(device, smoke):
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        llama("1b", "cpu", torch.float32, True if smoke else False).save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                                           bnb_4bit_quant_type="nf4"),
            device_map={"": device} if device.type == "cuda" else None,
        )  # fmt: skip
    model = get_peft_model(quantized, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    reqs = requests(random.Random(4), 16, 256 if not smoke else 20, 64 if not smoke else 6, model.config.vocab_size)
    start = synced()
    fused = score_requests(model, reqs, show_progress=False).sums
    seconds = synced() - start
    model.train()
    naive = [plain(model, r) for r in reqs]
    return {"largest_gap": float(max(abs(a - b) for a, b in zip(fused, naive))), "seconds": seconds}


def section_online_memory(device, smoke):
    model = llama("1b", device, torch.bfloat16, smoke)
    reqs = requests(random.Random(5), 32, 512 if not smoke else 24, 128 if not smoke else 8, model.config.vocab_size,
                    groups=4)  # fmt: skip
    peaks = []
    for _ in range(10):
        peak_reset()
        score_requests(model, reqs, show_progress=False)
        peaks.append(peak_gib())
    return {"peaks_gib": peaks}


SECTIONS = {
    "precision": section_precision,
    "attention": section_attention,
    "memory_8b": section_memory_8b,
    "planner": section_planner,
    "qlora": section_qlora,
    "online_memory": section_online_memory,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script itself runs")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU; `--smoke` runs tiny shapes on the CPU instead.")
    device = torch.device("cpu" if args.smoke else "cuda")
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "sections": {}}  # fmt: skip
    for name in args.sections:
        start = time.perf_counter()
        try:
            report["sections"][name] = SECTIONS[name](device, args.smoke)
        except Exception as error:  # noqa: BLE001 - recorded in the report; the other sections still run
            report["sections"][name] = {"error": f"{type(error).__name__}: {error}",
                                        "trace": traceback.format_exc()[-2000:]}  # fmt: skip
        report["sections"][name]["section_seconds"] = time.perf_counter() - start
        print(name, json.dumps(report["sections"][name])[:400], flush=True)
        peak_reset()
        temporary = args.output + ".tmp"
        with open(temporary, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(temporary, args.output)
    failed = [name for name, section in report["sections"].items() if "error" in section]
    if failed:
        raise SystemExit(f"gpu_check.py: sections {failed} failed; see {args.output}.")


if __name__ == "__main__":
    main()
