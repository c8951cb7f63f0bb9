"""ICA for preference pairs on SmolLM2-135M-Instruct (CPU): how well the score finds flipped pairs, and what the
ICA DPO and SimPO trainers cost next to TRL's.

Quality: GSM8K pairs (reference solution against a corrupted one), a share of them flipped; AUROC of each score for
ranking correct pairs above flipped ones. Cost, for DPOTrainer and CPOTrainer in SimPO mode, same data and LoRA:
one epoch with ICA scoring once before training (R = 1) against the stock epoch, and the online step against the
floor (stock step + one no-grad forward of the batch). Step times are medians of `--repeats` steps on one batch,
all measured in one run.

    python -m benchmarks.preference [--n-pairs 48] [--flip 0.4] [--batch-size 4] [--repeats 3]
"""

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from benchmarks.common.evaluation import median_step
from benchmarks.common.models import lora as recipe_lora
from trl_ica import ICADPOConfig, ICADPOTrainer, score_ica
from trl_ica.cli.scenarios import auroc, noisy_gsm8k_pairs
from trl_ica.embedded import default_model_path
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.selection.baselines import oneshot_scores

warnings.filterwarnings("ignore")


def quality(model, tokenizer, args):
    train, holdout, _ = noisy_gsm8k_pairs(args.n_pairs, 16, 0, args.flip, args.seed)
    correct = ~np.array(train["flipped"])
    train = train.remove_columns("flipped")
    print(f"\n### Flipped-pair detection: {len(train)} pairs, {(~correct).mean():.0%} flipped, 16 holdout pairs\n")
    print("| score | demos | AUROC correct vs flipped |")
    print("|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for selection in args.selections:
        result = score_ica(
            model,
            tokenizer,
            train,
            holdout,
            ICAScoringOptions(
                num_demos=3, demo_selection=selection, layout="in_turn", form="difference", reduction="sum"
            ),
        )
        tokens = result.pair_tokens
        cond, plain = result.pair_logps[:, :2] / tokens, result.pair_logps[:, 2:] / tokens
        per_token = (cond[:, 0] - cond[:, 1]) - (plain[:, 0] - plain[:, 1])  # the score with reduction="mean"
        print(f"| ICA margin change (sum, the paper's) | {selection} | {auroc(result.scores, correct):.3f} |")
        print(f"| ICA margin change per token | {selection} | {auroc(per_token, correct):.3f} |")
        print(
            f"| conditioned margin log p(y_w\\|D,x) - log p(y_l\\|D,x) | {selection} | "
            f"{auroc(result.logp_conditioned, correct):.3f} |"
        )
        # form="conditioned", reduction="mean": the margin with demonstrations, per token
        print(
            f'| conditioned margin per token (`ica_score_form="conditioned"`, mean) | {selection} | '
            f"{auroc(cond[:, 0] - cond[:, 1], correct):.3f} |"
        )
    tokens = result.pair_tokens
    per_token_margin = result.pair_logps[:, 2] / tokens[:, 0] - result.pair_logps[:, 3] / tokens[:, 1]
    print(
        f"| model margin log p(y_w\\|x) - log p(y_l\\|x) (loss baseline) | none | "
        f"{auroc(result.logp_unconditioned, correct):.3f} |"
    )
    print(f"| model margin per token | none | {auroc(per_token_margin, correct):.3f} |")
    oneshot = oneshot_scores(model, tokenizer, train, holdout, num_queries=3)
    print(f"| One-Shot: gain of the 3 nearest holdout margins | the pair | {auroc(oneshot, correct):.3f} |")
    print(f"| random | none | {auroc(rng.random(len(correct)), correct):.3f} |")


def epoch_time(trainer):
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def median_forward(trainer, batch, repeats):
    """Median no-grad forward of `batch`'s ids and mask through the trainer's model, after one warm-up."""
    model = trainer.model
    inputs = {key: batch[key].to(model.device) for key in ("input_ids", "attention_mask")}
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def floor_forward(trainer, batch, repeats, kind):
    """Median no-grad forward of the batch's chosen and rejected rows."""
    if kind == "cpo":
        concat = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
        batch = {
            "input_ids": concat["concatenated_input_ids"],
            "attention_mask": concat["concatenated_attention_mask"],
        }
    return median_forward(trainer, batch, repeats)


def cost(path, tokenizer, args):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from trl_ica import ICASimPOConfig
    from trl_ica.trainer.cpo_trainer import ICACPOTrainer

    train, holdout, _ = noisy_gsm8k_pairs(args.epoch_pairs, 16, 0, 0.0, args.seed)
    train = train.remove_columns("flipped")
    common = dict(
        output_dir="/tmp/bench_preference",
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=args.batch_size,
        gradient_checkpointing=False,
        max_length=1024,
        disable_tqdm=True,
    )
    lora = recipe_lora()
    kinds = {
        "dpo": (DPOTrainer, DPOConfig, ICADPOTrainer, ICADPOConfig, dict(beta=0.5)),
        "simpo": (CPOTrainer, CPOConfig, ICACPOTrainer, ICASimPOConfig, dict(loss_type="simpo", cpo_alpha=0.0)),
    }
    print(f"\n### Cost: {len(train)} pairs, batch {args.batch_size}, LoRA r=16 all-linear, {args.threads} threads\n")
    print(
        "| trainer | stock epoch (s) | ICA R=1 epoch (s) | R=1 / stock | stock step (s) | floor (s) | "
        "online step (s) | online / floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (stock_cls, stock_cfg, ica_cls, ica_cfg, extra) in kinds.items():

        def make(cls, cfg, extra=extra, **fields):
            ica = cls in (ICADPOTrainer, ICACPOTrainer)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return cls(
                model,
                args=cfg(**common, **extra, **fields),
                train_dataset=train,
                processing_class=tokenizer,
                peft_config=lora,
                **(dict(holdout_dataset=holdout) if ica else {}),
            )

        t_stock_epoch = epoch_time(make(stock_cls, stock_cfg, num_train_epochs=1))
        start = time.perf_counter()
        ica = make(ica_cls, ica_cfg, num_train_epochs=1, ica_demo_selection="fixed", ica_demo_layout="in_turn")
        t_ica_epoch = time.perf_counter() - start + epoch_time(ica)  # demo selection, scoring and training

        stock = make(stock_cls, stock_cfg, max_steps=1)
        rows = [stock.train_dataset[i] for i in range(args.batch_size)]
        batch = stock._prepare_inputs(stock.data_collator(rows))
        t_step = median_step(stock, batch, args.repeats)
        t_floor = t_step + floor_forward(stock, batch, args.repeats, "dpo" if name == "dpo" else "cpo")
        online = make(
            ica_cls, ica_cfg, max_steps=1, ica_refresh="online", ica_demo_selection="fixed", ica_demo_layout="in_turn"
        )
        ica_rows = [online.train_dataset[i] for i in range(args.batch_size)]
        t_online = median_step(online, online._prepare_inputs(online.data_collator(ica_rows)), args.repeats)
        print(
            f"| {name} | {t_stock_epoch:.1f} | {t_ica_epoch:.1f} | {t_ica_epoch / t_stock_epoch:.2f} | {t_step:.2f} | "
            f"{t_floor:.2f} | {t_online:.2f} | {t_online / t_floor:.2f} |",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-pairs", type=int, default=48)
    parser.add_argument("--epoch-pairs", type=int, default=16)
    parser.add_argument("--flip", type=float, default=0.4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=["quality", "cost"])
    parser.add_argument("--selections", nargs="+", default=["fixed"], choices=["fixed", "knn", "random"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.skip != "quality":
        quality(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, args)
    if args.skip != "cost":
        cost(path, tokenizer, args)


if __name__ == "__main__":
    main()
