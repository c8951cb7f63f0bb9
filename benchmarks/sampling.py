"""Step time of sampling by weight: ICASFTTrainer with `ica_weight_mode="sampling"` against stock SFTTrainer and
against ICA loss weights, on the same rows.

SmolLM2-135M-Instruct on the CPU at the LoRA recipe's settings (r = 16 on every linear layer, dropout 0.05, batch 4,
gradient checkpointing) with no accumulation, on `--n` rows of the noisy GSM8K pool. Sampling trains other rows than
the stock order, so every row is cut to the same `--length` tokens (`max_length`; only rows longer than that, whose
prompt leaves room for answer tokens, are taken): every step of every run then trains the same number of tokens, and
a difference of step time is the cost of the way the weights act, not of the rows drawn. Both ICA runs take one set
of seeded random scores as their one scoring (`use_scores`, `ica_weighting="global_minmax"`), so no scoring enters a
step. The three runs train in this one process, one after the other, so their ratios compare like with like.
Reported per run: the median seconds of an optimizer step after the first, and tokens per second.

    python -m benchmarks.sampling [--n 96] [--length 192] [--steps 8] [--results benchmarks/results/sampling.json]

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


def equal_length_rows(tokenizer, n: int, length: int, answer_tokens: int = 32):
    """`n` rows of the noisy GSM8K pool (training and holdout) whose chat-rendered conversation is longer than
    `length` tokens and whose prompt leaves at least `answer_tokens` of them to the answer: cut to `length`, every
    row trains the same number of tokens."""
    from trl_ica.cli.scenarios import noisy_gsm8k

    pool, holdout, _ = noisy_gsm8k(4 * n, 24, 8, seed=0)
    pool = pool.remove_columns("corruption")

    def fits(row) -> bool:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        return len(_ids(prompt)) <= length - answer_tokens and len(_ids(whole)) > length

    keep = [i for i in range(len(pool)) if fits(pool[i])][:n]
    if len(keep) < n:
        raise SystemExit(f"--n {n} --length {length}: only {len(keep)} of {len(pool)} pool rows are long enough.")
    return pool.select(keep), holdout


def _ids(tokens) -> list:
    """Token ids from `apply_chat_template(tokenize=True)`, which returns a list or a `BatchEncoding` by version."""
    return tokens["input_ids"] if hasattr(tokens, "keys") else tokens


def run(kind: str, n: int, length: int, steps: int) -> dict:
    import numpy as np
    import torch
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer
    from trl_ica.embedded import load_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = load_model()
    train, holdout = equal_length_rows(tokenizer, n, length)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-sampling-"),
        max_steps=steps,
        per_device_train_batch_size=4,
        max_length=length,
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

    lengths = {len(r["input_ids"]) for r in trainer.train_dataset}
    if lengths != {length}:
        raise SystemExit(f"rows of {sorted(lengths)} tokens after SFT's truncation; every row must have {length}.")
    seconds = timed_training(trainer)
    tokens = length * 4
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
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--results", default="benchmarks/results/sampling.json")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("`--steps` must be at least 2: the first step is reported apart.")
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    results = load_results(args.results)
    check_settings(results, {"n": args.n, "length": args.length, "steps": args.steps}, args.results)
    results.setdefault("runs", {})
    for kind in RUNS:
        if kind not in results["runs"]:
            results["runs"][kind] = run(kind, args.n, args.length, args.steps)
            save_results(results, args.results)
            print(kind, results["runs"][kind], flush=True)
    print("\n".join(results_table(results)))


def results_table(results: dict) -> list[str]:
    """Per run: seconds per step against `SFTTrainer`, and tokens per second (for `python -m benchmarks.report`)."""
    base = results["runs"]["stock"]["median_step_seconds_after_first"]
    length = results["settings"]["length"]
    lines = [
        "| run | s per step (median after the first) | range after the first | x SFTTrainer "
        f"| tokens/s ({length} x 4 per step) |",
        "|---|---|---|---|---|",
    ]
    for kind in RUNS:
        r = results["runs"][kind]
        seconds = r["median_step_seconds_after_first"]
        later = r["step_seconds"][1:]
        lines.append(
            f"| {LABELS[kind]} | {seconds:.2f} | {min(later):.2f}-{max(later):.2f} | {seconds / base:.2f} "
            f"| {r['tokens_per_second']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
