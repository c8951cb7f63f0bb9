"""How well each training-free score finds the data that matters, on SmolLM2-135M-Instruct (CPU).

Two pools, one AUROC per method (larger score = selected):
- noisy GSM8K: clean rows against corrupted ones (wrong final number, another problem's solution, truncated),
  with a clean GSM8K holdout;
- a reasoning-gym mixture (leg counting, arithmetic, chain sums, letter counting, bit counting): rows of the
  target task (leg counting) against the others, with a target-task holdout.

RHO-Loss's reference model is SmolLM2 fine-tuned with LoRA on the holdout (SFTTrainer, merged).

    python -m benchmarks.selection [--scenarios gsm8k mixture] [--n 40] [--seed 0]
"""

import argparse
import tempfile
import time
import warnings

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from benchmarks.common.data import reasoning_gym_mixture
from benchmarks.common.models import lora as recipe_lora
from trl_ica import score_ica
from trl_ica.cli.assets import load_model
from trl_ica.cli.scenarios import auroc, noisy_gsm8k
from trl_ica.selection.baselines import score_dataset
from trl_ica.selection.whisperer import WhispererConfig, whisperer_scores

warnings.filterwarnings("ignore")


def reference_model(holdout, epochs):
    """SmolLM2 with a LoRA adapter trained on the holdout, merged: RHO-Loss's reference."""
    model, _ = load_model()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=4, num_train_epochs=epochs, learning_rate=2e-4,
            bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=100,
        )  # fmt: skip
        lora = recipe_lora()
        trainer = SFTTrainer(model=model, args=args, train_dataset=holdout, peft_config=lora)
        trainer.train()
        return trainer.model.merge_and_unload().eval()


def run(name, train, holdout, positive, model, tokenizer, args):
    print(f"\n### {name}: {len(train)} rows, {positive.mean():.0%} positive, {len(holdout)} holdout rows\n")
    print("| method | AUROC | time (s) |")
    print("|---|---|---|")
    small = dict(num_demos=5, num_queries=3, batch_size=8, max_new_tokens=args.max_new_tokens, seed=args.seed)
    start = time.perf_counter()
    rho_reference = reference_model(holdout, args.rho_epochs)
    rho_train = time.perf_counter() - start
    start = time.perf_counter()
    ica = score_ica(model, tokenizer, train, holdout, num_demos=3, demo_selection="knn", layout="in_turn")
    ica_time = time.perf_counter() - start
    methods = [
        ("ica (k=3 kNN demos, sum: the paper's)", lambda: ica.scores),
        ("ica per token (same forwards)", lambda: (ica.logp_conditioned - ica.logp_unconditioned) / ica.num_tokens),
        (
            "whisperer, exact match, pool queries",
            lambda: whisperer_scores(model, tokenizer, train, None, WhispererConfig(**small), show_progress=False),
        ),
        (
            "whisperer, log-likelihood, pool queries",
            lambda: whisperer_scores(
                model, tokenizer, train, None, WhispererConfig(metric="log_likelihood", **small), show_progress=False
            ),
        ),
        (
            "whisperer, log-likelihood, holdout queries",
            lambda: whisperer_scores(
                model,
                tokenizer,
                train,
                holdout,
                WhispererConfig(metric="log_likelihood", **small),
                show_progress=False,
            ),  # fmt: skip
        ),
        ("oneshot (3 nearest holdout answers)", lambda: score_dataset("oneshot", model, tokenizer, train, holdout)),
        (
            f"rho (reference: LoRA on the holdout, {args.rho_epochs} epochs, +{rho_train:.0f} s)",
            lambda: score_dataset("rho", model, tokenizer, train, reference_model=rho_reference),
        ),
        ("loss (mean log p(y | x))", lambda: score_dataset("loss", model, tokenizer, train)),
        ("ifd", lambda: score_dataset("ifd", model, tokenizer, train)),
        ("random", lambda: score_dataset("random", None, None, train, seed=args.seed)),
    ]
    for label, fn in methods:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start + (ica_time if label.startswith("ica (") else 0)
        extra = ""
        if hasattr(out, "summary"):
            summary = out.summary()
            extra = f" ({summary['prompts']} prompts, {summary['unparsed_prompts']} unparsed, " + (
                f"{summary['missing_answers']} answers missing, {summary['tied_rows']} tied rows)"
            )
            out = out.scores
        print(f"| {label}{extra} | {auroc(out, positive):.3f} | {seconds:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["gsm8k", "mixture"], choices=["gsm8k", "mixture"])
    parser.add_argument("--n", type=int, default=40, help="GSM8K pool size; the mixture has 16 rows per task.")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rho-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    if "gsm8k" in args.scenarios:
        train, holdout, _ = noisy_gsm8k(n_train=args.n, n_holdout=16, n_test=0, noise=0.4, seed=args.seed)
        clean = np.array(train["corruption"]) == "clean"
        run("Noisy GSM8K, clean vs corrupted", train.remove_columns("corruption"), holdout, clean, model, tokenizer,
            args)  # fmt: skip
    if "mixture" in args.scenarios:
        train, holdout, _ = reasoning_gym_mixture(seed=args.seed)
        target = np.array(train["task"]) == "leg_counting"
        run("Reasoning-gym mixture, target task (leg counting) vs the rest", train.remove_columns("task"), holdout,
            target, model, tokenizer, args)  # fmt: skip


if __name__ == "__main__":
    main()
