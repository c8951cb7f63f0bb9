"""Fused ICA scoring against the naive per-candidate computation on SmolLM2-135M-Instruct.

For fixed and kNN demonstrations (k = 3) on GSM8K-length responses and on short responses (the final answer only),
times the whole scoring (both passes) of the fused engine and of the naive path (each candidate's full sequence run
on its own, batch 1, same LM-head-at-response-only kernel, so the ratio isolates prefix sharing), and prints the
token-count bound (tokens naive runs / tokens fused runs), the number of shared prefixes and the largest score gap.

    python scripts/bench_scoring.py [--n 24] [--threads 2]
"""

import argparse
import time

import numpy as np
import torch

from trl_ica.cli.assets import load_model
from trl_ica.cli.scenarios import noisy_gsm8k
from trl_ica.scoring.engine import LogProbRequest, score_requests, token_counts
from trl_ica.scoring.ica import prepare_ica


def short_answers(dataset):
    def cut(row):
        answer = row["completion"][0]["content"].split("####")[-1].strip()
        return {"completion": [{"role": "assistant", "content": f"The answer is {answer}."}]}

    return dataset.map(cut)


def run_once(model, requests, naive: bool):
    if naive:
        requests = [LogProbRequest((), r.prefix + r.context, r.response) for r in requests]
    start = time.perf_counter()
    out = score_requests(model, requests, batch_size=1 if naive else None, show_progress=False)
    return out.sums, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n_train=args.n, n_holdout=16, n_test=1, noise=0.0, seed=0)
    train = train.remove_columns("corruption")
    print(
        "| responses | demos | candidates | distinct shared prefixes | fused ex/s | naive ex/s | speed-up | bound "
        "| speed-up / bound | max abs score diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, data, hold in (
        ("GSM8K solutions", train, holdout),
        ("short answers", short_answers(train), short_answers(holdout)),
    ):
        for selection in ("fixed", "knn"):
            builder = prepare_ica(model, tokenizer, data, hold, demo_selection=selection, show_progress=False)
            cond = [builder.conditioned(i) for i in range(len(data))]
            plain = [builder.unconditioned(i) for i in range(len(data))]
            requests = cond + plain
            run_once(model, requests[:4], naive=False)  # warm-up
            fused, t_fused = run_once(model, requests, naive=False)
            naive, t_naive = run_once(model, requests, naive=True)
            n_naive, n_fused, shared = token_counts(cond)
            p_naive, p_fused, _ = token_counts(plain)
            bound = (n_naive + p_naive) / (n_fused + p_fused)
            speed = t_naive / t_fused
            diff = np.abs(fused - naive).max()
            print(
                f"| {label} | {selection} | {len(data)} | {shared} (+1 unconditioned) | {len(data) / t_fused:.2f} "
                f"| {len(data) / t_naive:.2f} | {speed:.2f}x | {bound:.2f}x | {speed / bound:.2f} | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
