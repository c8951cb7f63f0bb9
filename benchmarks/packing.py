"""Step time with packing: packed ICASFTTrainer against packed SFTTrainer and against unpacked ICASFTTrainer.

SmolLM2-135M-Instruct on the CPU at the LoRA recipe's settings (r = 16 on every linear layer, dropout 0.05, batch 4,
max length 1024, gradient checkpointing, the recommended ICA settings scored once before training) except for the
recipe's 4 micro-batches of accumulation, `--accumulation` here (1 by default: a packed step of 4 x 1024 tokens takes
minutes on two cores), on `--n` rows of the noisy GSM8K pool. Packing is TRL's `bfd` at the max length. The three runs
train in this one process, one after the other, so their ratios compare like with like. Reported per run: the
seconds of each optimizer step after the first (the first also holds ICA's one scoring, reported apart as the first
step's excess), the training tokens per step and tokens per second.

    python -m benchmarks.packing [--n 96] [--steps 3] [--accumulation 1] [--results benchmarks/results/packing.json]

Each run's result is kept in the JSON file (written whole) and skipped when run again; the file records its settings
and refuses a run with other ones.
"""

import argparse
import tempfile
import warnings

from benchmarks.common.evaluation import timed_training
from benchmarks.common.models import lora as recipe_lora

warnings.filterwarnings("ignore")
RUNS = ("stock_packed", "ica_packed", "ica_unpacked")


def run(kind: str, n: int, n_holdout: int, steps: int, accumulation: int) -> dict:
    import numpy as np
    import torch
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer
    from trl_ica.cli.scenarios import noisy_gsm8k
    from trl_ica.embedded import load_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n, n_holdout, 8, seed=0)
    train = train.remove_columns("corruption")
    lora = recipe_lora(dropout=0.05)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-packing-"),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        max_length=1024,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        logging_steps=steps,
        gradient_checkpointing=True,
        packing=kind.endswith("_packed"),
        seed=0,
    )
    if kind == "stock_packed":
        trainer = SFTTrainer(
            model, args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
    else:
        trainer = ICASFTTrainer(
            model,
            args=ICASFTConfig(**common),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
            peft_config=lora,
        )

    seconds = timed_training(trainer)
    rows = len(trainer.train_dataset)
    tokens = int(sum(len(r["input_ids"]) for r in trainer.train_dataset))
    per_step = tokens / rows * 4 * accumulation  # 4 rows per micro-batch, on average
    return {
        "step_seconds": [float(s) for s in seconds],
        "median_step_seconds_after_first": float(np.median(seconds[1:])),
        "first_step_excess_seconds": float(seconds[0] - np.median(seconds[1:])),
        "rows": rows,
        "tokens_per_step": per_step,
        "tokens_per_second": per_step / float(np.median(seconds[1:])),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--n-holdout", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--results", default="benchmarks/results/packing.json")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("`--steps` must be at least 2: the first step holds the scoring and is reported apart.")
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    settings = {"n": args.n, "n_holdout": args.n_holdout, "steps": args.steps, "accumulation": args.accumulation}
    results = load_results(args.results)
    check_settings(results, settings, args.results)
    results.setdefault("runs", {})
    for kind in RUNS:
        if kind not in results["runs"]:
            results["runs"][kind] = run(kind, args.n, args.n_holdout, args.steps, args.accumulation)
            save_results(results, args.results)
            print(kind, results["runs"][kind], flush=True)
    print("\n".join(results_table(results)))


LABELS = {
    "stock_packed": "packed SFTTrainer",
    "ica_packed": "packed ICASFTTrainer",
    "ica_unpacked": "unpacked ICASFTTrainer",
}


def results_table(results: dict) -> list[str]:
    """Per run: rows, tokens and seconds per step against packed `SFTTrainer`, and the first step's excess (for
    `python -m benchmarks.report`)."""
    base = results["runs"]["stock_packed"]
    lines = [
        "| run | rows | tokens per step | s per step (after the first) | x packed SFTTrainer | tokens/s | "
        "first step's excess (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in RUNS:
        r = results["runs"][kind]
        ratio = r["median_step_seconds_after_first"] / base["median_step_seconds_after_first"]
        lines.append(
            f"| {LABELS[kind]} | {r['rows']} | {r['tokens_per_step']:.0f} | "
            f"{r['median_step_seconds_after_first']:.1f} | {ratio:.2f} | {r['tokens_per_second']:.0f} | "
            f"{r['first_step_excess_seconds']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
