"""Data Whisperer selection time on SmolLM2-135M-Instruct (CPU): trl_ica's implementation against the
straightforward one of the authors' code (per prompt: HF `generate`, then a second forward with eager attention
returning every layer's attention matrix; tests/reference.py), on the same prompts, in one run.

Both draw the same prompts, so scores must agree up to floating-point rounding; the script reports the largest
difference, the speed-up and how often the generations differ.

    python -m benchmarks.whisperer [--n 24] [--num-demos 5] [--num-queries 3] [--metrics exact_match log_likelihood]
        [--results benchmarks/results/whisperer.json]

Each metric's result is kept in the JSON file (written whole) and skipped when run again; the file records its
settings and refuses a run with other ones.
"""

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common.reference import naive_whisperer
from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from trl_ica.cli.scenarios import noisy_gsm8k
from trl_ica.embedded import load_model
from trl_ica.scoring.formats import read_dataset
from trl_ica.selection.whisperer import Metric, WhispererConfig, build_prompts, split_answers, whisperer_scores

warnings.filterwarnings("ignore")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="Pool size (noisy GSM8K rows).")
    # The authors' script defaults: 5 demonstrations and 3 queries per prompt.
    parser.add_argument("--num-demos", type=int, default=5)
    parser.add_argument("--num-queries", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--metrics", nargs="+", default=["exact_match", "log_likelihood"], choices=["exact_match", "log_likelihood"]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default="benchmarks/results/whisperer.json")
    args = parser.parse_args()
    settings = {
        k: getattr(args, k) for k in ("n", "num_demos", "num_queries", "batch_size", "max_new_tokens", "threads")
    }
    results = load_results(args.results)
    check_settings(results, settings, args.results)
    results.setdefault("runs", {})
    todo = [m for m in args.metrics if m not in results["runs"]]
    if todo:
        measure(todo, args, results)
    print("\n".join(results_table(results)))


def measure(metrics, args, results) -> None:
    """Time both implementations on each metric of `metrics` into `results["runs"]`, saving the file after each."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    train, _, _ = noisy_gsm8k(n_train=args.n, n_holdout=0, n_test=0, seed=0)
    train = train.remove_columns("corruption")
    pool = read_dataset(train, "dataset")
    layer = model.config.num_hidden_layers // 2
    results["layer"] = layer
    runs = results["runs"]
    for metric in metrics:
        config = WhispererConfig(
            num_demos=args.num_demos,
            num_queries=args.num_queries,
            metric=metric,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        start = time.perf_counter()
        ours = whisperer_scores(model, tokenizer, train, config=config, show_progress=False)
        fast = time.perf_counter() - start
        builder, prompts = build_prompts(tokenizer, pool, None, config)
        scorer = metric if metric == "log_likelihood" else Metric(metric)
        start = time.perf_counter()
        scores, records = naive_whisperer(
            model, tokenizer, pool, pool, prompts, builder, scorer, args.num_queries, layer, args.max_new_tokens
        )
        slow = time.perf_counter() - start
        # trl_ica stops a row once nothing more can be parsed; the straightforward loop runs to EOS or the budget
        same = sum(
            split_answers(a.get("generation", ""), args.num_queries)
            == split_answers(b.get("generation", ""), args.num_queries)
            for a, b in zip(ours.records, records)
        )
        runs[metric] = {
            "prompts": len(prompts),
            "seconds": fast,
            "straightforward_seconds": slow,
            "max_score_difference": float(np.max(np.abs(ours.scores - scores))),
            "same_parsed_answers": int(same),
        }
        save_results(results, args.results)
        print(metric, runs[metric], flush=True)


def results_table(results: dict) -> list[str]:
    """Per metric: both implementations' seconds, the speed-up, the scores' largest difference and the parsed answers
    that agree (for `python -m benchmarks.report`)."""
    s = results["settings"]
    lines = [
        f"{s['n']} GSM8K rows, n_d = {s['num_demos']}, n_q = {s['num_queries']}, layer {results['layer']}, up to "
        f"{s['max_new_tokens']} new tokens, batch {s['batch_size']}, {s['threads']} threads:",
        "",
        "| metric | prompts | trl_ica (s) | straightforward (s) | speed-up | max score difference "
        "| same parsed answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, r in results["runs"].items():
        lines.append(
            f"| {metric} | {r['prompts']} | {r['seconds']:.1f} | {r['straightforward_seconds']:.1f} "
            f"| {r['straightforward_seconds'] / r['seconds']:.2f}x | {r['max_score_difference']:.1e} "
            f"| {r['same_parsed_answers']}/{r['prompts']} |"
        )
    return lines


if __name__ == "__main__":
    main()
