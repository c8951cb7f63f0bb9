"""The embedded demo: ICA-weighted LoRA fine-tuning of SmolLM2-135M-Instruct on SFT data whose noise hurts, on the CPU.

The training pool is one-digit sums of which half the answers were replaced by answers of another task (relation
words such as "aunt": the wrong kind of answer, as when a pipeline mixes its sources). The pool is scored once
against a clean holdout; the same LoRA is then trained three times for the same steps: uniform weights on the noisy
pool, uniform weights on its clean rows only (the oracle, which knows the labels), and the weighting the benchmark
supports for this kind of noise (docs/benchmarks.md). It reports the clean test loss of each and the share of the
noise gap ICA weights recover, whichever way it comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from ..data_io import write_json
from ..embedded import DEFAULT_MODEL, resolve_model
from ..plots import plot_score_histogram
from ..presets import preset_settings
from .scenarios import LABEL_NOISE_KINDS, auroc, reasoning_gym_label_noise

#: The ICA trainer's defaults (`trl_ica.presets`), which the label-noise benchmark supports for this noise.
RECOMMENDED = preset_settings("recommended", "sft")
#: How the demo's ICA run spends the weights, in words.
ICA_RUN = f"the ICA defaults ({RECOMMENDED['ica_score_form']} form, {RECOMMENDED['ica_weighting']} weights, " + (
    "rows drawn by weight)" if RECOMMENDED["ica_weight_mode"] == "sampling" else "on each row's loss)"
)
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def top_layer_lora(model, top_layers: int):
    """LoRA r = 16 on every linear layer of the top `top_layers` decoder layers: no gradient flows below them, so a
    step costs little more than a forward."""
    from peft import LoraConfig

    layers = model.config.num_hidden_layers
    if not 1 <= top_layers <= layers:
        raise ValueError(f"`--top-layers` must be in [1, {layers}] (the model's layers), got {top_layers}.")
    return LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=LORA_MODULES,
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(layers - top_layers, layers)),
    )


def _load(model_path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model, tokenizer


def _test_loss(model, tokenizer, test) -> float:
    """Mean per-token NLL of the clean test answers given their questions."""
    from ..scoring.engine import score_requests
    from ..scoring.formats import read_dataset
    from ..scoring.rendering import Renderer

    renderer = Renderer(tokenizer)
    rows = read_dataset(test.select_columns(["prompt", "completion"]))
    out = score_requests(model, [renderer.unconditioned(e) for e in rows], show_progress=False)
    return float(-out.sums.sum() / out.counts.sum())


def _train(model_path, tokenizer, train, holdout, output_dir, weighted: bool, args, scores=None):
    """The same LoRA run, with stock `SFTTrainer` (uniform) or `ICASFTTrainer` (the recommended weighting; `scores`,
    computed with the same untrained model and settings, are its one scoring, so the pool is scored once)."""
    from trl import SFTConfig, SFTTrainer

    from ..trainer.sft_config import ICASFTConfig
    from ..trainer.sft_trainer import ICASFTTrainer

    model, _ = _load(model_path)
    common = dict(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=args.steps,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=args.seed,
        max_length=512,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    lora = top_layer_lora(model, args.top_layers)
    if not weighted:
        config = SFTConfig(**common)
        trainer = SFTTrainer(model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    else:
        config = ICASFTConfig(**common, ica_num_demos=args.num_demos, ica_demo_selection="fixed", ica_seed=args.seed)
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
    train, holdout, test, clean = reasoning_gym_label_noise(
        noise=args.noise,
        noise_kind=args.noise_kind,
        n_train=args.n_train,
        n_holdout=args.n_holdout,
        n_test=args.n_test,
        seed=args.seed,
    )
    kind = LABEL_NOISE_KINDS[args.noise_kind]
    print(
        f"Model {args.model}; {len(train)} training examples of one-digit sums, {(~clean).mean():.0%} of them with "
        f"{kind}; {len(holdout)} clean holdout, {len(test)} clean test problems."
    )

    from ..scoring.ica import score_ica
    from ..scoring.options import ICAScoringOptions

    # the recommended rendering with the paper's summed difference: its parts give the other scores compared
    options = ICAScoringOptions(
        num_demos=args.num_demos, demo_selection="fixed", form="difference", reduction="sum", seed=args.seed
    )
    scores = score_ica(model, tokenizer, train, holdout, options)
    conditioned = scores.logp_conditioned / scores.num_tokens
    summary = {
        "auroc_conditioned_per_token": auroc(conditioned, clean),
        "auroc_ica_paper": auroc(scores.scores, clean),
        "auroc_loss_baseline": auroc(scores.logp_unconditioned / scores.num_tokens, clean),
        "settings": {**RECOMMENDED, "ica_num_demos": args.num_demos, "ica_demo_selection": "fixed"},
    }
    print("\nHow each score ranks the clean examples above the noisy ones (AUROC: 1.0 = every clean example scores")
    print("higher, 0.5 = chance):")
    print(
        f"  log p(y | 3 holdout demos, x) per token (conditioned)  {summary['auroc_conditioned_per_token']:.3f}"
        "  <- the weights below"
    )
    print(f"  the paper's difference, summed                         {summary['auroc_ica_paper']:.3f}")
    print(f"  log p(y | x) per token (the loss baseline)             {summary['auroc_loss_baseline']:.3f}")
    os.makedirs(args.output_dir, exist_ok=True)
    labels = np.where(clean, "clean", "noisy")
    plot = plot_score_histogram(
        conditioned,
        os.path.join(args.output_dir, "scores.png"),
        labels=labels,
        title="log p(y | demos, x) per token, by label",
    )
    if plot:
        print(f"  score histogram: {plot}")

    losses = {"before": _test_loss(model, tokenizer, test)}
    runs = (
        ("uniform", train, False, "uniform weights on the noisy pool"),
        ("oracle", train.select(np.flatnonzero(clean)), False, "uniform weights on its clean rows only (the oracle)"),
        ("ICA", train, True, ICA_RUN),
    )
    for name, rows, weighted, what in runs:
        print(f"\nLoRA fine-tune with {what}: {args.steps} steps of {args.batch_size}...", flush=True)
        start = time.time()
        trainer = _train(
            model_path, tokenizer, rows, holdout, os.path.join(args.output_dir, name), weighted, args, conditioned
        )
        losses[name] = _test_loss(trainer.model, tokenizer, test)
        print(f"  clean test loss {losses[name]:.4f} nats/token ({time.time() - start:.0f} s)")
        if weighted:
            logged = [json.loads(line) for line in open(os.path.join(args.output_dir, name, "ica", "weights.jsonl"))]
            index = np.array([r["ica_index"] for r in logged])
            weight = np.array([r["weight"] for r in logged])
            summary["mean_weight_clean"] = float(weight[clean[index]].mean()) if clean[index].any() else None
            summary["mean_weight_noisy"] = float(weight[~clean[index]].mean()) if (~clean[index]).any() else None
            summary["noisy_share_trained"] = float((~clean[index]).mean())  # each logged record is a row trained
    summary.update({f"test_loss_{k.lower()}": v for k, v in losses.items()})
    print("\nResult")
    if summary.get("mean_weight_clean") is not None and summary.get("mean_weight_noisy") is not None:
        print(
            f"  mean ICA weight of the rows trained: clean {summary['mean_weight_clean']:.3f}, noisy "
            f"{summary['mean_weight_noisy']:.3f}"
        )
    if "noisy_share_trained" in summary:
        print(
            f"  rows trained: {summary['noisy_share_trained']:.1%} noisy (the pool: {(~clean).mean():.0%}; a row of "
            "weight 0 is never drawn under sampling, and trains at weight 0 under loss weights)"
        )
    print(
        f"  clean test loss (nats/token): before training {losses['before']:.4f} | uniform {losses['uniform']:.4f} "
        f"| oracle {losses['oracle']:.4f} | ICA {losses['ICA']:.4f}"
    )
    gap = losses["uniform"] - losses["oracle"]
    if gap > 0.02:  # a share of a smaller gap is mostly the runs' own noise
        summary["share_of_noise_gap_recovered"] = (losses["uniform"] - losses["ICA"]) / gap
        print(
            f"  the noise costs uniform training {gap:+.4f} nats/token against the oracle; the ICA run recovers "
            f"{summary['share_of_noise_gap_recovered']:.0%} of that gap."
        )
    else:
        print(
            f"  here the noise cost uniform training {gap:+.4f} nats/token against the oracle, too little for a "
            "share of it to mean anything (see docs/benchmarks.md)."
        )
    verdict = "lower" if losses["ICA"] < losses["uniform"] else "not lower"
    print(
        f"  the ICA run gave a {verdict} clean test loss than uniform weights "
        f"({losses['ICA'] - losses['uniform']:+.4f})."
    )
    summary["seconds"] = time.time() - started
    write_json(summary, os.path.join(args.output_dir, "summary.json"))
    print(f"  summary: {os.path.join(args.output_dir, 'summary.json')} ({summary['seconds']:.0f} s)")
    return summary


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local path, or the embedded default.")
    parser.add_argument("--output-dir", default="outputs/demo", help="Where the runs, the plot and summary.json go.")
    # no "mixture": there the benchmark supports selection, not weights (docs/scores.md, "Which score to trust")
    parser.add_argument(
        "--noise-kind",
        default="other_task",
        choices=["other_task", "shuffled"],
        help="other_task: answers of another task; shuffled: answers of other sums.",
    )
    parser.add_argument("--noise", type=float, default=0.5, help="Share of the pool's answers replaced.")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-holdout", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--num-demos", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--top-layers", type=int, default=4, help="LoRA on the top this many decoder layers.")
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
