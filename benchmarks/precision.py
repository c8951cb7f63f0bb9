"""Rounding of float32 log-probabilities over a real vocabulary: `log_softmax` against `logsumexp`.

Runs SmolLM2-135M-Instruct in float32 over GSM8K solutions (the unconditioned ICA requests), takes the logits at
every response position, and compares each float32 way of turning a logit row into the target's log-probability
with the float64 value of the same logits: the mean error per token (a bias adds up over a sum; noise mostly
cancels), the largest, and the error of the summed log-probability of each response. Also times both on the rows
(mean of 5 after a warm-up).

    python -m benchmarks.precision [--n 8] [--threads 2] [--results benchmarks/results/precision.json]

The results are written whole to `--results` (refused when it holds a run with other settings) and rebuilt into
docs/benchmarks.md by `python -m benchmarks.report`.
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
    parser.add_argument("--results", default="benchmarks/results/precision.json")
    args = parser.parse_args()
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    results = load_results(args.results)
    check_settings(results, {"n": args.n, "threads": args.threads}, args.results)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n_train=args.n, n_holdout=5, n_test=1, noise=0.0, seed=0)
    builder = prepare_ica(
        model,
        tokenizer,
        train.remove_columns("corruption"),
        holdout,
        ICAScoringOptions(layout="in_turn", form="difference", reduction="sum", span=None),
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
    results.update(
        vocabulary=model.get_output_embeddings().weight.shape[0],
        tokens=[int(t) for t in tokens],
        ways={
            name: {
                "mean_error": float(np.concatenate(errors[name]).mean()),
                "largest_error": float(np.abs(np.concatenate(errors[name])).max()),
                "largest_sum_error": float(np.abs(sums[name]).max()),
                "seconds": seconds[name],
            }
            for name in ways
        },
    )
    save_results(results, args.results)
    print("\n".join(results_table(results)))


def results_table(results: dict) -> list[str]:
    """Each float32 way's error against float64 and its time (for `python -m benchmarks.report`)."""
    tokens = results["tokens"]
    lines = [
        f"SmolLM2-135M-Instruct, vocabulary {results['vocabulary']:,}, {len(tokens)} GSM8K solutions, "
        f"{sum(tokens)} response positions ({min(tokens)} to {max(tokens)} per response), "
        f"{results['settings']['threads']} threads:",
        "",
        f"| float32 computation | mean error / token | largest error / token | largest error of a sum | time "
        f"({sum(tokens)} rows) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["ways"].items():
        lines.append(
            f"| {name} | {r['mean_error']:+.2e} | {r['largest_error']:.2e} | {r['largest_sum_error']:.2e} | "
            f"{r['seconds']:.3f} s |"
        )
    return lines


if __name__ == "__main__":
    main()
