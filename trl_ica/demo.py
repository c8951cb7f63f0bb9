"""The embedded demo: ICA-weighted LoRA fine-tuning of SmolLM2-135M-Instruct on a noisy GSM8K pool, on the CPU.

It scores a training pool of which a known share is corrupted (wrong final answers, solutions of other questions,
truncated solutions) against a clean holdout, then trains the same LoRA twice (uniform weights, ICA weights) and
compares the loss on clean held-out test problems. It prints what it measures, whichever way it comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from .assets import DEFAULT_MODEL, resolve_model
from .plots import plot_score_histogram
from .scenarios import CORRUPTIONS, auroc, noisy_gsm8k


def _load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model, tokenizer


def _test_loss(model, tokenizer, test) -> float:
    """Mean per-token NLL of the clean test answers given their questions."""
    from .engine import score_requests
    from .formats import read_dataset
    from .rendering import Renderer

    renderer = Renderer(tokenizer)
    out = score_requests(model, [renderer.unconditioned(e) for e in read_dataset(test)], show_progress=False)
    return float(-out.sums.sum() / out.counts.sum())


def _train(model_path, tokenizer, train, holdout, output_dir, weighted: bool, args, scores=None):
    """The same LoRA run, with stock `SFTTrainer` (uniform) or `ICASFTTrainer` (ICA weights; `scores`, computed
    with the same untrained model and settings, are its one scoring, so the pool is scored once)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from .sft_config import ICASFTConfig
    from .sft_trainer import ICASFTTrainer

    model, _ = _load(model_path)
    common = dict(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=args.seed,
        max_length=1024,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if not weighted:
        trainer = SFTTrainer(
            model, args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
    else:
        config = ICASFTConfig(**common, ica_demo_selection=args.demo_selection, ica_num_demos=args.num_demos)
        trainer = ICASFTTrainer(
            model,
            args=config,
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
            peft_config=lora,
        )
        trainer.ica.use_scores(scores, "the demo's scoring of the pool")
    trainer.train()
    return trainer


def run(args) -> dict:
    torch.manual_seed(args.seed)
    started = time.time()
    model_path = resolve_model(args.model)
    model, tokenizer = _load(model_path)
    train, holdout, test = noisy_gsm8k(args.n_train, args.n_holdout, args.n_test, args.noise, args.seed)
    labels = np.array(train["corruption"])
    train = train.remove_columns("corruption")
    print(
        f"Model {args.model}; {len(train)} training examples ({(labels != 'clean').mean():.0%} corrupted), "
        f"{len(holdout)} clean holdout, {len(test)} clean test problems."
    )

    from .scoring import score_ica

    scores = score_ica(
        model, tokenizer, train, holdout, num_demos=args.num_demos, demo_selection=args.demo_selection, seed=args.seed
    )
    clean = labels == "clean"
    per_token = scores.scores / scores.num_tokens
    summary = {
        "auroc_ica": auroc(scores.scores, clean),
        "auroc_ica_per_token": auroc(per_token, clean),
        "auroc_loss_baseline": auroc(scores.logp_unconditioned / scores.num_tokens, clean),
        "by_corruption": {},
    }
    print("\nHow the ICA score (log p(y | 3 holdout demos, x) - log p(y | x)) ranks clean above corrupted examples")
    print("(AUROC: 1.0 = every clean example scores higher, 0.5 = chance):")
    print(f"  ICA score (sum, the paper's)   {summary['auroc_ica']:.3f}")
    print(f"  ICA score per token            {summary['auroc_ica_per_token']:.3f}")
    print(f"  plain log p(y | x) per token   {summary['auroc_loss_baseline']:.3f}  (the loss baseline, for reference)")
    print(f"  mean score: clean {scores.scores[clean].mean():+.2f}", end="")
    for kind in CORRUPTIONS:
        mask = labels == kind
        summary["by_corruption"][kind] = {
            "mean_score": float(scores.scores[mask].mean()),
            "auroc_vs_clean": auroc(scores.scores[clean | mask], clean[clean | mask]),
        }
        print(f", {kind} {scores.scores[mask].mean():+.2f}", end="")
    print()

    os.makedirs(args.output_dir, exist_ok=True)
    plot = plot_score_histogram(
        scores.scores, os.path.join(args.output_dir, "scores.png"), labels=labels, title="ICA scores on noisy GSM8K"
    )
    if plot:
        print(f"  score histogram by corruption kind: {plot}")

    base_loss = _test_loss(model, tokenizer, test)
    losses = {}
    runs = (
        ("uniform", train, False, "uniform weights"),
        ("oracle", train.select(np.flatnonzero(clean)), False, "uniform weights on the clean rows only (the oracle)"),
        ("ICA", train, True, "ICA weights"),
    )
    for name, rows, weighted, what in runs:
        print(f"\nLoRA fine-tune with {what} ({args.steps} steps of {args.batch_size})...", flush=True)
        out = os.path.join(args.output_dir, name)
        trainer = _train(model_path, tokenizer, rows, holdout, out, weighted, args, scores.scores)
        losses[name] = _test_loss(trainer.model, tokenizer, test)
        if weighted:
            rows = [json.loads(line) for line in open(os.path.join(args.output_dir, name, "ica", "weights.jsonl"))]
            w = {r["ica_index"]: r["weight"] for r in rows}
            trained = np.array(sorted(w))
            weights = np.array([w[i] for i in trained])
            summary["mean_weight_clean"] = float(weights[clean[trained]].mean())
            summary["mean_weight_corrupted"] = float(weights[~clean[trained]].mean())
    summary.update(
        test_loss_before=base_loss,
        test_loss_uniform=losses["uniform"],
        test_loss_oracle=losses["oracle"],
        test_loss_ica=losses["ICA"],
    )
    print("\nResult")
    print(
        f"  mean ICA weight: clean {summary['mean_weight_clean']:.3f}, corrupted "
        f"{summary['mean_weight_corrupted']:.3f}"
    )
    print(
        f"  clean test loss (nats/token): before {base_loss:.4f} | uniform {losses['uniform']:.4f} | "
        f"oracle {losses['oracle']:.4f} | ICA {losses['ICA']:.4f}"
    )
    gap = losses["uniform"] - losses["oracle"]
    if gap > 0.02:  # a share of a smaller gap is mostly the runs' own noise
        summary["share_of_noise_gap_recovered"] = (losses["uniform"] - losses["ICA"]) / gap
        print(
            f"  the noise costs uniform training {gap:+.4f} nats/token against the oracle; ICA weights recover "
            f"{summary['share_of_noise_gap_recovered']:.0%} of that gap."
        )
    else:
        print(
            f"  here the noise cost uniform training {gap:+.4f} nats/token against the oracle, too little for a share "
            "of it to mean anything: this pool's noise does not hurt this short run (see docs/benchmarks.md)."
        )
    verdict = "lower" if losses["ICA"] < losses["uniform"] else "not lower"
    print(
        f"  ICA-weighted training gave a {verdict} clean test loss than uniform weights "
        f"({losses['ICA'] - losses['uniform']:+.4f})."
    )
    summary["seconds"] = time.time() - started
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"  summary: {os.path.join(args.output_dir, 'summary.json')} ({summary['seconds']:.0f} s)")
    return summary


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local path, or the embedded default.")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-holdout", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--num-demos", type=int, default=3)
    parser.add_argument("--demo-selection", default="fixed", choices=["knn", "fixed", "random"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def quiet() -> None:
    """Keep the demo's output to its own report: no library deprecation notes or per-map progress bars."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def main(argv=None):
    quiet()
    run(make_parser().parse_args(argv))


if __name__ == "__main__":
    main()
