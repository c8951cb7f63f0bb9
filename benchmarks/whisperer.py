"""Data Whisperer selection time on SmolLM2-135M-Instruct (CPU): trl_ica's implementation against the
straightforward one of the authors' code (per prompt: HF `generate`, then a second forward with eager attention
returning every layer's attention matrix; tests/reference.py), on the same prompts, in one run.

Both draw the same prompts, so scores must agree up to floating-point rounding; the script reports the largest
difference, the speed-up and how often the generations differ.

    python -m benchmarks.whisperer [--n 24] [--num-demos 5] [--num-queries 3] [--metrics exact_match log_likelihood]
"""

import argparse
import time
import warnings

import numpy as np
import torch

from benchmarks.common.reference import naive_whisperer
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
    parser.add_argument("--metrics", nargs="+", default=["exact_match", "log_likelihood"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    train, _, _ = noisy_gsm8k(n_train=args.n, n_holdout=0, n_test=0, seed=0)
    train = train.remove_columns("corruption")
    pool = read_dataset(train, "dataset")
    layer = model.config.num_hidden_layers // 2
    print(
        f"\n### Data Whisperer selection time: {args.n} GSM8K rows, n_d={args.num_demos}, n_q={args.num_queries}, "
        f"layer {layer}, up to {args.max_new_tokens} new tokens, {args.threads} threads\n"
    )
    print(
        "| metric | prompts | trl_ica (s) | straightforward (s) | speed-up | max score difference "
        "| same parsed answers |"
    )
    print("|---|---|---|---|---|---|---|")
    for metric in args.metrics:
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
        print(
            f"| {metric} | {len(prompts)} | {fast:.1f} | {slow:.1f} | {slow / fast:.2f}x | "
            f"{np.max(np.abs(ours.scores - scores)):.1e} | {same}/{len(prompts)} |"
        )


if __name__ == "__main__":
    main()
