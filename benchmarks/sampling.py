"""Step time of sampling by weight: ICASFTTrainer with `ica_weight_mode="sampling"` against stock SFTTrainer and
against ICA loss weights, on the same rows.

SmolLM2-135M-Instruct on the CPU at the LoRA recipe's settings (r = 16 on every linear layer, dropout 0.05, batch 4,
max length 1024, gradient checkpointing) with no accumulation, on `--n` rows of the noisy GSM8K pool. Both ICA runs
take one set of seeded random scores as their one scoring (`use_scores`, `ica_weighting="global_minmax"`), so no
scoring enters a step and the runs differ only in where the weights act; sampling draws other rows than the stock
order, of the same length distribution. The three runs train in this one process, one after the other, so their
ratios compare like with like. Reported per run: the median seconds of an optimizer step after the first, and
tokens per second.

    python -m benchmarks.sampling [--n 96] [--steps 6] [--results benchmarks/results/sampling.json]

Each run's result is kept in the JSON file (written whole) and skipped when run again; the file records its settings
and refuses a run with other ones.
"""

import argparse
import tempfile
import warnings

from benchmarks.common.evaluation import timed_training
from benchmarks.common.models import lora as recipe_lora

warnings.filterwarnings("ignore")
RUNS = ("stock", "ica_loss", "ica_sampling")
LABELS = {
    "stock": "SFTTrainer",
    "ica_loss": "ICASFTTrainer, loss weights",
    "ica_sampling": 'ICASFTTrainer, `ica_weight_mode="sampling"`',
}


def run(kind: str, n: int, steps: int) -> dict:
    import numpy as np
    import torch
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer
    from trl_ica.cli.scenarios import noisy_gsm8k
    from trl_ica.embedded import load_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n, 24, 8, seed=0)
    train = train.remove_columns("corruption")
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-sampling-"),
        max_steps=steps,
        per_device_train_batch_size=4,
        max_length=1024,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        logging_steps=steps,
        gradient_checkpointing=True,
        seed=0,
    )
    lora = recipe_lora(dropout=0.05)
    if kind == "stock":
        trainer = SFTTrainer(
            model, args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
    else:
        mode = "sampling" if kind == "ica_sampling" else "loss"
        args = ICASFTConfig(**common, ica_weighting="global_minmax", ica_weight_mode=mode, ica_demo_selection="fixed")
        trainer = ICASFTTrainer(
            model,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
            peft_config=lora,
        )
        trainer.ica.use_scores(np.random.default_rng(0).random(n), "benchmarks.sampling random scores")

    seconds = timed_training(trainer)
    tokens = float(np.mean([len(r["input_ids"]) for r in trainer.train_dataset])) * 4
    median = float(np.median(seconds[1:]))
    return {
        "step_seconds": [float(s) for s in seconds],
        "median_step_seconds_after_first": median,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / median,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--results", default="benchmarks/results/sampling.json")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("`--steps` must be at least 2: the first step is reported apart.")
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    results = load_results(args.results)
    check_settings(results, {"n": args.n, "steps": args.steps}, args.results)
    results.setdefault("runs", {})
    for kind in RUNS:
        if kind not in results["runs"]:
            results["runs"][kind] = run(kind, args.n, args.steps)
            save_results(results, args.results)
            print(kind, results["runs"][kind], flush=True)
    print("\n".join(results_table(results)))


def results_table(results: dict) -> list[str]:
    """Per run: seconds per step against `SFTTrainer`, and tokens per second (for `python -m benchmarks.report`)."""
    base = results["runs"]["stock"]["median_step_seconds_after_first"]
    lines = [
        "| run | s per step (median after the first) | x SFTTrainer | tokens/s (mean row length x 4) |",
        "|---|---|---|---|",
    ]
    for kind in RUNS:
        r = results["runs"][kind]
        seconds = r["median_step_seconds_after_first"]
        lines.append(f"| {LABELS[kind]} | {seconds:.2f} | {seconds / base:.2f} | {r['tokens_per_second']:.0f} |")
    return lines


if __name__ == "__main__":
    main()
