"""How prefixes share on the CPU: the cost model of `score_requests(sharing="auto")` against the measured time of
each way of sharing, on SmolLM2-135M-Instruct.

The conditioned pass of `--n` GSM8K rows with exact kNN demonstrations (k = 3 of a holdout of `--n-holdout`), in
the in-turn layout, run by the engine with `sharing` = `tree`, `flat`, `none` and `auto`: forwards and tokens as
[`sharing_costs`] counts them, and seconds (the fastest of `--repeats` after a warm-up). Beside them, the per-forward
cost in tokens that `measure_forward_overhead` finds for SmolLM2 and for the tests' tiny Llama, and the way `auto`
picks with the CPU's fixed default (`DEFAULT_OVERHEAD["cpu"]`) and with each measurement.

    python -m benchmarks.sharing [--n 48] [--n-holdout 32] [--repeats 2] [--threads 2]
        [--results benchmarks/results/sharing.json]

The whole run is kept in the JSON file (written whole) and not run again; the file records its settings and refuses a
run with other ones.
"""

import argparse
import time
import warnings

warnings.filterwarnings("ignore")
SHARINGS = ("tree", "flat", "none", "auto")
#: The shape of the tests' tiny Llama (`tests/testing_utils.tiny_llama`), where a forward's cost is Python's.
TINY_LLAMA = dict(
    vocab_size=400,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def measure(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_ica.cli.scenarios import noisy_gsm8k
    from trl_ica.embedded import load_model
    from trl_ica.scoring import engine
    from trl_ica.scoring.ica import prepare_ica
    from trl_ica.scoring.options import ICAScoringOptions
    from trl_ica.scoring.planner import DEFAULT_OVERHEAD, choose_sharing, sharing_costs

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n_train=args.n, n_holdout=args.n_holdout, n_test=1, noise=0.0, seed=0)
    train = train.remove_columns("corruption")
    options = ICAScoringOptions(demo_selection="knn", layout="in_turn", num_demos=3, span=None)
    builder = prepare_ica(model, tokenizer, train, holdout, options, show_progress=False)
    requests = [builder.conditioned(i) for i in range(len(train))]
    device = torch.device("cpu")
    budget = engine.ScoringBudget().resolve(device)
    costs = sharing_costs(requests, budget)
    with torch.no_grad():
        overheads = {"SmolLM2-135M-Instruct": engine.measure_forward_overhead(engine._ForwardRunner(model, device))}
        torch.manual_seed(0)
        tiny = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
        overheads["a tiny Llama (2 layers of width 32, as the tests')"] = engine.measure_forward_overhead(
            engine._ForwardRunner(tiny, device)
        )
    default = DEFAULT_OVERHEAD["cpu"]
    runs = {}
    engine.score_requests(model, requests[:4], show_progress=False, sharing="tree")  # warm-up
    for sharing in SHARINGS:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.score_requests(model, requests, show_progress=False, sharing=sharing)
            best = min(best, time.perf_counter() - start)
        runs[sharing] = {"seconds": best}
        print(sharing, f"{best:.1f} s", flush=True)
    chosen = choose_sharing(requests, budget, None, default)
    for sharing in ("tree", "flat", "none"):
        runs[sharing]["forwards"], runs[sharing]["tokens"] = costs[sharing]
    runs["auto"].update(forwards=costs[chosen][0], tokens=costs[chosen][1], chose=chosen)
    return {
        "runs": runs,
        "default_overhead": default,
        "measured_overhead": overheads,
        "chosen_with_measured": {name: choose_sharing(requests, budget, None, o) for name, o in overheads.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--n-holdout", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="benchmarks/results/sharing.json")
    args = parser.parse_args()
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    results = load_results(args.results)
    settings = {"n": args.n, "n_holdout": args.n_holdout, "repeats": args.repeats, "threads": args.threads}
    check_settings(results, settings, args.results)
    if "runs" not in results:
        results.update(measure(args))
        save_results(results, args.results)
    print("\n".join(results_table(results)))


def results_table(results: dict) -> list[str]:
    """Forwards, tokens and seconds of each way of sharing, and the per-forward costs measured (for
    `python -m benchmarks.report`)."""
    s = results["settings"]
    runs = results["runs"]
    fastest = min(("tree", "flat", "none"), key=lambda k: runs[k]["seconds"])
    lines = [
        f"Conditioned pass of {s['n']} GSM8K rows with exact kNN (k = 3 of a holdout of {s['n_holdout']}), "
        f"SmolLM2-135M-Instruct, {s['threads']} threads, the fastest of {s['repeats']}:",
        "",
        "| sharing | forwards | tokens | seconds | / fastest |",
        "|---|---|---|---|---|",
    ]
    for sharing in SHARINGS:
        r = runs[sharing]
        name = f"**auto** (chose {r['chose']})" if sharing == "auto" else sharing
        lines.append(
            f"| {name} | {r['forwards']} | {r['tokens']:,} | {r['seconds']:.1f} "
            f"| {r['seconds'] / runs[fastest]['seconds']:.2f} |"
        )
    lines += [
        "",
        "| model | per-forward cost measured (tokens) | `auto` would choose |",
        "|---|---|---|",
        f"| (the CPU's fixed default) | {results['default_overhead']:.0f} | {runs['auto']['chose']} |",
    ]
    for name, overhead in results["measured_overhead"].items():
        lines.append(f"| {name} | {overhead:.0f} | {results['chosen_with_measured'][name]} |")
    return lines


if __name__ == "__main__":
    main()
