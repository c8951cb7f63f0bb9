"""What ICA scoring costs against training, per scorer: seconds per 1,000 rows of scoring by SmolLM2-135M-Instruct
and by Qwen2.5-Coder-0.5B-Instruct, against one LoRA epoch of each as the trained model, all measured in one run.

Scoring: the recommended SFT score (conditioned form per token, k = 3 fixed demonstrations as earlier turns; one
pass) of `--rows` rows of the label-noise pool (one-digit sums, half the answers shuffled), fp32 on the CPU.
Training: stock SFTTrainer with the recipes' LoRA (r = 16 on every linear layer), batch `--batch-size`, on the same
rows; the median optimizer-step time over `--steps` steps after a warm-up step, times 1,000 / batch. The difference
form would run a second, shorter pass without demonstrations.

    python -m benchmarks.scorer_cost [--rows 200] [--steps 3] [--results benchmarks/results/scorer_cost.json]

Each model's numbers are kept in the results file as they are measured (a rerun skips a model it holds; a file made
with other settings is refused).
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from benchmarks.common.models import QWEN_05B, lora, qwen_05b_path
from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from trl_ica.cli.scenarios import reasoning_gym_label_noise
from trl_ica.embedded import DEFAULT_MODEL, load_model
from trl_ica.scoring.ica import score_ica
from trl_ica.scoring.options import ICAScoringOptions

warnings.filterwarnings("ignore")
MODELS = {DEFAULT_MODEL: "SmolLM2-135M-Instruct", QWEN_05B: "Qwen2.5-Coder-0.5B-Instruct"}


class StepClock(TrainerCallback):
    """Wall time of each optimizer step."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def measure(name: str, rows, holdout, args) -> dict:
    model, tokenizer = load_model(qwen_05b_path() if name == QWEN_05B else name)
    parameters = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    score_ica(
        model,
        tokenizer,
        rows,
        holdout,
        ICAScoringOptions(
            num_demos=3, demo_selection="fixed", form="conditioned", reduction="mean", layout="turns", span=None
        ),
        show_progress=False,
    )
    scoring = time.perf_counter() - start
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=args.steps + 1,
            per_device_train_batch_size=args.batch_size,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            max_length=512,
            seed=0,
        )
        trainer = SFTTrainer(model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora())
        trainer.add_callback(clock)
        trainer.train()
    step = statistics.median(clock.times[1:])
    return {
        "scoring_seconds_per_1k": scoring * 1000 / len(rows),
        "training_step_seconds": step,
        "training_seconds_per_1k": step * 1000 / args.batch_size,
        "parameters": parameters,
    }


def results_table(results: dict) -> list[str]:
    """Per model: scoring and a LoRA epoch in seconds per 1,000 rows, and their ratio (for
    `python -m benchmarks.report`)."""
    done = [m for m in MODELS if m in results]
    lines = [
        "| model | parameters | ICA scoring, s per 1,000 rows | LoRA epoch, s per 1,000 rows | scoring / epoch |",
        "|---|---|---|---|---|",
    ]
    for m in done:
        r = results[m]
        share = r["scoring_seconds_per_1k"] / r["training_seconds_per_1k"]
        lines.append(
            f"| {MODELS[m]} | {r['parameters'] / 1e6:.0f}M | {r['scoring_seconds_per_1k']:.0f} | "
            f"{r['training_seconds_per_1k']:.0f} | {share:.2f} |"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps, after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows, holdout, _, _ = reasoning_gym_label_noise(
        "basic_arithmetic", "family_relationships", 0.5, "shuffled", args.rows, 32, 8, seed=0
    )
    results = load_results(args.results)
    check_settings(results, {"rows": args.rows, "steps": args.steps, "batch_size": args.batch_size}, args.results)
    for name in args.models:
        if name not in results:
            results[name] = measure(name, rows, holdout, args)
            save_results(results, args.results)
            print(f"{MODELS[name]}: {results[name]}", flush=True)
    print("\n".join(results_table(results)))
    if all(m in results for m in MODELS):
        small, large = (results[m] for m in MODELS)
        score = small["scoring_seconds_per_1k"]
        print(
            f"Scoring with the 135M model costs {score / large['scoring_seconds_per_1k']:.2f} of scoring with the "
            f"0.5B model, and {score / large['training_seconds_per_1k']:.2f} of a LoRA epoch of the 0.5B model."
        )


if __name__ == "__main__":
    main()
