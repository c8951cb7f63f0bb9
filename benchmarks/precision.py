"""Rounding of float32 log-probabilities over a real vocabulary: `log_softmax` against `logsumexp`.

Runs SmolLM2-135M-Instruct in float32 over GSM8K solutions (the unconditioned ICA requests), takes the logits at
every response position, and compares each float32 way of turning a logit row into the target's log-probability
with the float64 value of the same logits: the mean error per token (a bias adds up over a sum; noise mostly
cancels), the largest, and the error of the summed log-probability of each response. Also times both on the rows
(mean of 5 after a warm-up).

    python -m benchmarks.precision [--n 8] [--threads 2]
"""

import argparse
import time

import numpy as np
import torch

from trl_ica.cli.scenarios import noisy_gsm8k
from trl_ica.embedded import load_model
from trl_ica.scoring.ica import prepare_ica
from trl_ica.scoring.options import ICAScoringOptions

REPEATS = 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8, help="GSM8K solutions scored")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n_train=args.n, n_holdout=5, n_test=1, noise=0.0, seed=0)
    builder = prepare_ica(
        model,
        tokenizer,
        train.remove_columns("corruption"),
        holdout,
        ICAScoringOptions(layout="in_turn", form="difference", reduction="sum"),
        show_progress=False,
    )
    ways = {
        "log_softmax (float32)": lambda x, t: x.log_softmax(-1).gather(-1, t[:, None])[:, 0],
        "logit - logsumexp (float32)": lambda x, t: x.gather(-1, t[:, None])[:, 0] - torch.logsumexp(x, -1),
    }
    errors = {name: [] for name in ways}
    sums = {name: [] for name in ways}
    seconds = dict.fromkeys(ways, 0.0)
    tokens = []
    with torch.no_grad():
        for i in range(args.n):
            r = builder.unconditioned(i)
            ids = list(r.prefix + r.context + r.response)
            start = len(ids) - len(r.response)
            logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1].float()
            targets = torch.tensor(ids[start:])
            truth = logits.double().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            tokens.append(len(targets))
            for name, way in ways.items():
                way(logits, targets)  # warm-up
                begin = time.perf_counter()
                for _ in range(REPEATS):
                    got = way(logits, targets)
                seconds[name] += (time.perf_counter() - begin) / REPEATS
                error = (got.double() - truth).numpy()
                errors[name].append(error)
                sums[name].append(error.sum())
    vocab = model.get_output_embeddings().weight.shape[0]
    print(
        f"SmolLM2-135M-Instruct, vocabulary {vocab}, {args.n} GSM8K solutions, {sum(tokens)} tokens "
        f"({min(tokens)} to {max(tokens)} per response), {args.threads} threads"
    )
    print("| float32 computation | mean error / token | largest error / token | largest error of a sum | time |")
    print("|---|---|---|---|---|")
    for name in ways:
        e = np.concatenate(errors[name])
        print(
            f"| {name} | {e.mean():+.2e} | {np.abs(e).max():.2e} | {np.abs(sums[name]).max():.2e} "
            f"| {seconds[name]:.3f} s |"
        )


if __name__ == "__main__":
    main()
