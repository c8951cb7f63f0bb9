"""The figures of `trl-ica demo` at its defaults, kept for docs/benchmarks.md.

`python -m benchmarks.demo [--results benchmarks/results/demo.json]` runs the demo exactly as `trl-ica demo` does
(its own defaults: one-digit sums, half answered by another task, SmolLM2-135M-Instruct, the ICA trainer's defaults)
and keeps its `summary.json` with the demo's settings; `python -m benchmarks.report` rebuilds the table from it. A
`summary.json` of a `trl-ica demo` run at its defaults can be passed instead with `--summary`.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from benchmarks.common.results import save as save_results


def results_table(results: dict) -> list[str]:
    """What the demo measured (for `python -m benchmarks.report`)."""
    args, s = results["demo_args"], results["summary"]
    settings = s["settings"]
    lines = [
        f"{args['n_train']} training rows ({100 * args['noise']:.0f} % answered by another task), "
        f"{args['n_holdout']} clean holdout rows, {args['n_test']} clean test rows; {args['steps']} LoRA steps of "
        f"{args['batch_size']}, seed {args['seed']}; ICA run: `ica_weight_mode={settings['ica_weight_mode']!r}`, "
        f"`ica_weighting={settings['ica_weighting']!r}`, the {settings['ica_score_form']} form. Total "
        f"{s['seconds']:.0f} s.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| AUROC clean vs noisy: conditioned score per token (the one trained on) | "
        f"{s['auroc_conditioned_per_token']:.3f} |",
        f"| AUROC: the paper's difference, summed | {s['auroc_ica_paper']:.3f} |",
        f"| AUROC: log p(y \\| x) per token (the loss baseline) | {s['auroc_loss_baseline']:.3f} |",
    ]
    if s.get("mean_weight_clean") is not None and s.get("mean_weight_noisy") is not None:
        lines.append(
            f"| mean ICA weight of the rows trained: clean / noisy | {s['mean_weight_clean']:.3f} / "
            f"{s['mean_weight_noisy']:.3f} |"
        )
    if "noisy_share_trained" in s:
        lines.append(
            f"| noisy share of the rows trained (the pool's: {100 * args['noise']:.0f} %) | "
            f"{100 * s['noisy_share_trained']:.1f} % |"
        )
    lines.append(
        f"| clean test loss (nats/token): before / uniform / oracle / ICA | {s['test_loss_before']:.4f} / "
        f"{s['test_loss_uniform']:.4f} / {s['test_loss_oracle']:.4f} / {s['test_loss_ica']:.4f} |"
    )
    if "share_of_noise_gap_recovered" in s:
        lines.append(f"| share of the noise gap recovered | {100 * s['share_of_noise_gap_recovered']:.0f} % |")
    return lines


def main(argv=None):
    from trl_ica.cli.demo import make_parser, quiet, run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results/demo.json")
    parser.add_argument("--summary", help="The summary.json of a `trl-ica demo` run at its defaults, kept as is.")
    args = parser.parse_args(argv)
    demo_args = make_parser().parse_args([])
    if args.summary:
        with open(args.summary) as f:
            summary = json.load(f)
    else:
        quiet()
        with tempfile.TemporaryDirectory() as out:
            demo_args.output_dir = out
            summary = run(demo_args)
    kept = {k: v for k, v in vars(demo_args).items() if k != "output_dir"}
    results = {"demo_args": kept, "summary": summary}
    save_results(results, args.results)
    print("\n".join(results_table(results)))


if __name__ == "__main__":
    main()
