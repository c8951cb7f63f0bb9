"""ICA for preference pairs on SmolLM2-135M-Instruct (CPU): how well the score finds flipped pairs, and what the
ICA DPO and SimPO trainers cost next to TRL's.

Quality: GSM8K pairs (reference solution against a corrupted one), a share of them flipped; AUROC of each score for
ranking correct pairs above flipped ones. Cost, for DPOTrainer and CPOTrainer in SimPO mode, same data and LoRA:
one epoch with ICA scoring once before training (R = 1) against the stock epoch, and the online step against the
floor (stock step + one no-grad forward of the batch). Step times are medians of `--repeats` steps on one batch,
all measured in one run.

    python -m benchmarks.preference [--n-pairs 48] [--flip 0.4] [--batch-size 4] [--repeats 3] [--skip cost]

The results are written whole to `--results` after each part and rebuilt into docs/benchmarks.md by
`python -m benchmarks.report`.
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


def quality(model, tokenizer, args) -> dict:
    """AUROC of each score for ranking the correct pairs above the flipped ones: `{"pairs", "flipped", "rows"}`,
    each row `[score, demonstrations, AUROC]`."""
    train, holdout, _ = noisy_gsm8k_pairs(args.n_pairs, 16, 0, args.flip, args.seed)
    correct = ~np.array(train["flipped"])
    train = train.remove_columns("flipped")
    rows = []
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
        rows += [
            ["ICA margin change, sum over tokens (the paper's)", selection, auroc(result.scores, correct)],
            ['ICA margin change, per token (`ica_reduction="mean"`)', selection, auroc(per_token, correct)],
            [
                "conditioned margin alone, log p(y_w \\| D, x) - log p(y_l \\| D, x)",
                selection,
                auroc(result.logp_conditioned, correct),
            ],
            [
                'conditioned margin per token (`ica_score_form="conditioned"`, `ica_reduction="mean"`)',
                selection,
                auroc(cond[:, 0] - cond[:, 1], correct),
            ],
        ]
    tokens = result.pair_tokens
    per_token_margin = result.pair_logps[:, 2] / tokens[:, 0] - result.pair_logps[:, 3] / tokens[:, 1]
    oneshot = oneshot_scores(model, tokenizer, train, holdout, num_queries=3)
    rows += [
        [
            "model margin log p(y_w \\| x) - log p(y_l \\| x) (loss baseline, summed)",
            "none",
            auroc(result.logp_unconditioned, correct),
        ],
        ["model margin per token", "none", auroc(per_token_margin, correct)],
        [
            "One-Shot: the pair's chosen answer as the one demonstration, gain of its 3 nearest holdout margins",
            "the pair",
            auroc(oneshot, correct),
        ],
        ["random", "none", auroc(rng.random(len(correct)), correct)],
    ]
    return {"pairs": len(train), "flipped": float((~correct).mean()), "rows": [[a, b, float(c)] for a, b, c in rows]}


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


def cost(path, tokenizer, args) -> dict:
    """Per trainer, the stock and ICA R = 1 epochs and the stock, floor and online steps, in seconds."""
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
    out = {"pairs": len(train), "batch_size": args.batch_size, "threads": args.threads, "trainers": {}}
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
        t_step = median_step(stock, [batch], args.repeats)
        t_floor = t_step + floor_forward(stock, batch, args.repeats, "dpo" if name == "dpo" else "cpo")
        online = make(
            ica_cls, ica_cfg, max_steps=1, ica_refresh="online", ica_demo_selection="fixed", ica_demo_layout="in_turn"
        )
        ica_rows = [online.train_dataset[i] for i in range(args.batch_size)]
        t_online = median_step(online, [online._prepare_inputs(online.data_collator(ica_rows))], args.repeats)
        out["trainers"][name] = {
            "stock_epoch": t_stock_epoch,
            "ica_epoch": t_ica_epoch,
            "stock_step": t_step,
            "floor": t_floor,
            "online_step": t_online,
        }
        print(f"  {name}: {out['trainers'][name]}", flush=True)
    return out


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
    parser.add_argument("--results", default="benchmarks/results/preference.json")
    args = parser.parse_args()
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    results = load_results(args.results)
    settings = {k: getattr(args, k) for k in ("n_pairs", "epoch_pairs", "flip", "batch_size", "repeats", "seed")}
    check_settings(results, {**settings, "selections": args.selections, "threads": args.threads}, args.results)
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.skip != "quality":
        results["quality"] = quality(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, args)
        save_results(results, args.results)
    if args.skip != "cost":
        results["cost"] = cost(path, tokenizer, args)
        save_results(results, args.results)
    for lines in results_tables(results).values():
        print("\n".join(lines) + "\n")


def results_tables(results: dict) -> dict[str, list[str]]:
    """`{"quality": the AUROC table, "cost": the cost table}` of what `results` holds (for
    `python -m benchmarks.report`, blocks `timing/preference/quality` and `timing/preference/cost`)."""
    tables = {}
    if "quality" in results:
        q = results["quality"]
        tables["quality"] = [
            f"{q['pairs']} pairs, {q['flipped']:.0%} flipped, 16 clean holdout pairs, k = 3:",
            "",
            "| score | demonstrations | AUROC correct vs flipped |",
            "|---|---|---|",
            *(f"| {score} | {demos} | {value:.3f} |" for score, demos, value in q["rows"]),
        ]
    if "cost" in results:
        c = results["cost"]
        tables["cost"] = [
            f"{c['pairs']} pairs, batch {c['batch_size']}, {c['threads']} threads:",
            "",
            "| trainer | stock epoch (s) | ICA R = 1 epoch (s) | R = 1 / stock | stock step (s) | floor (s) | "
            "online step (s) | online / floor |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, t in c["trainers"].items():
            tables["cost"].append(
                f"| {dict(dpo='DPO', simpo='SimPO')[name]} | {t['stock_epoch']:.1f} | {t['ica_epoch']:.1f} | "
                f"{t['ica_epoch'] / t['stock_epoch']:.2f} | {t['stock_step']:.2f} | {t['floor']:.2f} | "
                f"{t['online_step']:.2f} | {t['online_step'] / t['floor']:.2f} |"
            )
    return tables


if __name__ == "__main__":
    main()
