"""Throughput of ICA scoring on SmolLM2-135M-Instruct: naive, whole-prefix sharing, the prefix tree, and the kNN
modes that create sharing; and what one R = 1 scoring costs against one LoRA training epoch of the same rows.

For each data kind (GSM8K solutions; short answers, the final answer only) and each demonstration choice (k = 3 of a
holdout of `--n-holdout`), the whole scoring (conditioned and unconditioned pass) is timed:

- `naive`: each candidate's full sequence on its own (batch 1, the same LM-head-at-response-only kernel);
- `flat`: the engine sharing whole prefixes only (`sharing="flat"`);
- `tree`: the engine as it runs by default, the prefix tree (`plan_prefixes`).

"bound" is tokens naive runs / tokens the mode runs (prefix pieces included); "reached" is the measured speed-up
over naive divided by that bound. Largest score gap against naive is printed as a check. The epoch is stock
`SFTTrainer` with the recipes' LoRA (r = 16, all linear layers), batch 4, over the same rows.

    python -m benchmarks.scoring [--n 48] [--n-holdout 32] [--threads 2] [--results benchmarks/results/scoring.json]

Each (data, selection, mode) timing is kept in the JSON file (written whole) and skipped when run again; the file
records its settings and refuses a run with other ones.
"""

import argparse
import tempfile
import time
import warnings

import numpy as np
import torch

from benchmarks.common.models import lora as recipe_lora
from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from trl_ica.cli.scenarios import noisy_gsm8k
from trl_ica.embedded import load_model
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.ica import prepare_ica
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.planner import LogProbRequest, token_counts

warnings.filterwarnings("ignore")
SELECTIONS = ("fixed", "knn", "knn_grouped")
MODES = {"fixed": ("flat",), "knn": ("naive", "flat", "tree"), "knn_grouped": ("tree",)}


def short_answers(dataset):
    def cut(row):
        answer = row["completion"][0]["content"].split("####")[-1].strip()
        return {"completion": [{"role": "assistant", "content": f"The answer is {answer}."}]}

    return dataset.map(cut)


def run_once(model, requests, mode: str):
    if mode == "naive":
        requests = [LogProbRequest((), r.prefix + r.context, r.response) for r in requests]
    start = time.perf_counter()
    out = score_requests(
        model,
        requests,
        batch_size=1 if mode == "naive" else None,
        show_progress=False,
        sharing=mode if mode in ("tree", "flat") else "none",
    )
    return out.sums, time.perf_counter() - start


def epoch_seconds(model_dir_model, tokenizer, data) -> float:
    from trl import SFTConfig, SFTTrainer

    lora = recipe_lora()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            out,
            num_train_epochs=1,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1000,
            max_length=1024,
            seed=0,
        )
        trainer = SFTTrainer(
            model_dir_model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.model.unload()  # the base model comes back without the adapter
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--n-holdout", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"n": args.n, "n_holdout": args.n_holdout, "threads": args.threads, "num_demos": 3}
    results = load_results(args.results)
    check_settings(results, settings, args.results)  # refuses a file of runs with other settings

    def save():
        save_results(results, args.results)

    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n_train=args.n, n_holdout=args.n_holdout, n_test=1, noise=0.0, seed=0)
    train = train.remove_columns("corruption")
    for label, data, hold in (
        ("GSM8K solutions", train, holdout),
        ("short answers", short_answers(train), short_answers(holdout)),
    ):
        reference = None
        for selection in SELECTIONS:
            builder = prepare_ica(
                model,
                tokenizer,
                data,
                hold,
                ICAScoringOptions(
                    demo_selection=selection, layout="in_turn", form="difference", reduction="sum", span=None
                ),
                show_progress=False,
            )
            requests = [builder.conditioned(i) for i in range(len(data))]
            requests += [builder.unconditioned(i) for i in range(len(data))]
            counts = token_counts(requests)
            run_once(model, requests[:4], "tree")  # warm-up
            for mode in MODES[selection]:
                key = f"{label} | {selection} | {mode}"
                if key in results:
                    continue
                sums, seconds = run_once(model, requests, mode)
                tokens = {"naive": counts.naive, "flat": counts.flat, "tree": counts.tree}[mode]
                results[key] = {
                    "seconds": seconds,
                    "examples_per_second": len(data) / seconds,
                    "naive_tokens": counts.naive,
                    "tokens": tokens,
                    "pieces": counts.pieces if mode == "tree" else counts.shared,
                    "distinct_demo_lists": len({tuple(d) for d in builder.demo_indices}),
                }
                if selection == "knn" and mode == "naive":
                    reference = sums
                if selection == "knn" and reference is not None:
                    results[key]["max_abs_diff_vs_naive"] = float(np.abs(sums - reference).max())
                save()
                print(
                    key, {k: round(v, 4) if isinstance(v, float) else v for k, v in results[key].items()}, flush=True
                )
        if f"{label} | LoRA epoch" not in results:
            results[f"{label} | LoRA epoch"] = {"seconds": epoch_seconds(model, tokenizer, data)}
            save()
    print("\n".join(results_table(results)))


#: The order the table lists the (demonstrations, sharing) pairs in.
ROWS = (("knn", "naive"), ("knn", "flat"), ("knn", "tree"), ("knn_grouped", "tree"), ("fixed", "flat"))


def results_table(results: dict) -> list[str]:
    """Per kind of response and (demonstrations, sharing): throughput, the speed-up over naive (for other
    demonstrations than exact kNN, naive time taken at exact kNN's naive tokens per second), the bound (naive tokens
    over the tokens the mode runs), the share of the bound reached and one scoring as a multiple of a LoRA epoch (for
    `python -m benchmarks.report`)."""
    lines = [
        "| responses | demonstrations | mode | distinct lists | pieces run | ex/s | speed-up over naive | "
        "bound | reached | scoring / LoRA epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ("GSM8K solutions", "short answers"):
        naive = results[f"{label} | knn | naive"]
        naive_rate = naive["naive_tokens"] / naive["seconds"]  # tokens per second at batch 1, no sharing
        epoch = results[f"{label} | LoRA epoch"]["seconds"]
        for i, (selection, mode) in enumerate(ROWS):
            r = results.get(f"{label} | {selection} | {mode}")
            if r is None:
                continue
            speedup = r["naive_tokens"] / naive_rate / r["seconds"]
            bound = r["naive_tokens"] / r["tokens"]
            pieces, reached = ("", "") if mode == "naive" else (str(r["pieces"]), f"{speedup / bound:.2f}")
            lines.append(
                f"| {label if i == 0 else ''} | {selection} | {mode} | {r['distinct_demo_lists']} | "
                f"{pieces} | {r['examples_per_second']:.2f} | {speedup:.2f}x | {bound:.2f}x | {reached} | "
                f"{r['seconds'] / epoch:.2f} |"
            )
    return lines


if __name__ == "__main__":
    main()
