"""Time of one online ICASFTTrainer optimizer step against SFTTrainer's, and against the floor (SmolLM2-135M, CPU).

One optimizer step of `--batch-size` rows x `--accumulation` micro-batches (the recipes' 4 x 4 by default), LoRA
r = 16 on all linear layers: every micro-batch's forward and backward, no optimizer update. Reports:

- the stock step (SFTTrainer);
- the floor: the stock step plus one no-grad forward over what the conditioned pass must run, each distinct
  demonstration prefix once plus the step's rows (timed as the engine's conditioned pass, which runs exactly that);
- the online ICA step, for each demonstration choice and score form asked for (both passes in the engine).

Every time is the median of `--repeats` steps after one warm-up, all measured in one run.

    python -m benchmarks.online [--batch-size 4] [--accumulation 4] [--repeats 3] [--selections fixed]
        [--forms difference conditioned] [--results benchmarks/results/online.json]

Each configuration's result is kept in the JSON file (written whole) and skipped when run again; the file records
its settings and refuses a run with other ones. The ratios compare runs of one process: a configuration added later
is timed against the stock step of its own run, which is kept beside it.
"""

import argparse
import itertools
import statistics
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from benchmarks.common.evaluation import median_step
from benchmarks.common.models import lora as recipe_lora
from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from trl_ica import ICASFTConfig, ICASFTTrainer
from trl_ica.cli.scenarios import noisy_gsm8k
from trl_ica.embedded import default_model_path
from trl_ica.scoring.engine import score_requests

warnings.filterwarnings("ignore")


def micro_batches(trainer, batch_size, accumulation):
    rows = [trainer.train_dataset[i] for i in range(batch_size * accumulation)]
    return [trainer.data_collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def median_conditioned_pass(trainer, indices, repeats):
    builder = trainer.ica.builder
    requests = [r for i in indices for r in builder.requests(i, True)]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        score_requests(trainer.model, requests, show_progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), len({r.prefix for r in requests})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--selections", nargs="+", default=["fixed"], choices=["fixed", "knn", "random"])
    parser.add_argument(
        "--forms", nargs="+", default=["difference", "conditioned"], choices=["difference", "conditioned"]
    )
    parser.add_argument("--results", default="benchmarks/results/online.json")
    args = parser.parse_args()
    results = load_results(args.results)
    settings = {k: getattr(args, k) for k in ("batch_size", "accumulation", "repeats", "threads")}
    check_settings(results, settings, args.results)
    runs = results.setdefault("runs", {})
    todo = [f"{s} | {f}" for s, f in itertools.product(args.selections, args.forms) if f"{s} | {f}" not in runs]
    if todo:
        measure(args, todo, results)
    print("\n".join(results_table(results)))


def measure(args, todo, results) -> None:
    """Time the stock step, then each configuration of `todo` (`"<selection> | <form>"`) into `results["runs"]`
    with that stock step beside it, saving the file after each."""
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = args.batch_size * args.accumulation
    train, holdout, _ = noisy_gsm8k(n_train=rows, n_holdout=16, n_test=1, noise=0.0, seed=0)
    train = train.remove_columns("corruption")
    common = dict(
        output_dir="/tmp/bench_online",
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        gradient_checkpointing=False,
        max_steps=1,
        disable_tqdm=True,
    )
    lora = recipe_lora()

    def model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    stock = SFTTrainer(
        model(), args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
    )
    batches = micro_batches(stock, args.batch_size, args.accumulation)
    t_stock = median_step(stock, batches, args.repeats)
    results["tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"SFTTrainer step {t_stock:.2f} s", flush=True)
    for key in todo:
        selection, form = key.split(" | ")
        fields = dict(
            ica_preset="paper",  # the paper's score and weights, the closing token scored, as measured
            ica_score_end_token=True,
            ica_refresh="online",
            ica_demo_selection=selection,
            ica_demo_layout="in_turn",
            ica_max_length=2048,
            ica_score_form=form,
        )
        if form == "conditioned":
            fields["ica_reduction"] = "mean"
        ica = ICASFTTrainer(
            model(),
            args=ICASFTConfig(**common, **fields),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
            peft_config=lora,
        )
        ica_batches = micro_batches(ica, args.batch_size, args.accumulation)
        indices = [i for b in ica_batches for i in b["ica_index"].tolist()]
        t_cond, prefixes = median_conditioned_pass(ica, indices, args.repeats)
        floor = t_stock + t_cond
        t = median_step(ica, ica_batches, args.repeats)
        results["runs"][key] = {"seconds": t, "stock_seconds": t_stock, "floor_seconds": floor, "prefixes": prefixes}
        save_results(results, args.results)
        print(key, results["runs"][key], flush=True)


def results_table(results: dict) -> list[str]:
    """The stock step, and each online configuration against it and against its floor (for
    `python -m benchmarks.report`)."""
    s = results["settings"]
    lines = [
        f"{s['batch_size']} rows x {s['accumulation']} micro-batches ({results['tokens']:,} tokens), LoRA r = 16 on "
        f"all linear layers, {s['threads']} threads, median of {s['repeats']} after a warm-up:",
        "",
        "| trainer | demos | form | step (s) | / stock | floor (s) | / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    stocks = sorted({r["stock_seconds"] for r in results["runs"].values()})
    for stock in stocks:
        lines.append(f"| SFTTrainer | | | {stock:.2f} | 1.00 | | |")
        for key, r in results["runs"].items():
            if r["stock_seconds"] != stock:
                continue
            selection, form = key.split(" | ")
            demos = f"{selection} ({r['prefixes']} prefix{'es' if r['prefixes'] > 1 else ''})"
            lines.append(
                f"| ICASFTTrainer online | {demos} | {form} | {r['seconds']:.2f} | {r['seconds'] / stock:.2f} "
                f"| {r['floor_seconds']:.2f} | {r['seconds'] / r['floor_seconds']:.2f} |"
            )
    return lines


if __name__ == "__main__":
    main()
