"""Peak memory of ICASFTTrainer against stock SFTTrainer at the LoRA recipe's settings (SmolLM2-135M-Instruct, CPU).

Each run trains in a fresh process, so that its peak is its own: the recipe's LoRA (r = 16, all linear layers), batch
4 x 4 accumulation, max length 1024, on the noisy GSM8K pool (`--n` rows, holdout `--n-holdout`). A sampler thread
reads the process's resident memory (RSS) every 10 ms and files each sample under "scoring" while the ICA engine or
the kNN embeddings run, else under "training". Reported: the peak of each, and the scoring peak's rise over the RSS
just before scoring began, against the token budget. Each process runs with `MALLOC_MMAP_THRESHOLD_=131072`, so that
glibc returns every freed buffer of 128 KB or more to the system at once: otherwise RSS keeps memory the process has
freed (the scoring's, for instance) and measures the allocator rather than what is alive.

    python -m benchmarks.memory [--n 64] [--steps 4] [--results benchmarks/results/memory.json]

Each run's result is kept in the JSON file (written whole) and skipped when run again; the file records its settings
and refuses a run with other ones.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from benchmarks.common.models import lora as recipe_lora

warnings.filterwarnings("ignore")
RUNS = ("stock", "ica_once", "ica_online")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(kind: str, n: int, n_holdout: int, steps: int, output: str) -> None:
    import torch
    from trl import SFTConfig, SFTTrainer

    import trl_ica.scoring.demonstrations as demonstrations
    import trl_ica.scoring.engine as engine
    from trl_ica import ICASFTConfig, ICASFTTrainer
    from trl_ica.cli.scenarios import noisy_gsm8k
    from trl_ica.embedded import load_model

    torch.set_num_threads(2)
    state = {"scoring": 0, "peak": {"training": 0, "scoring": 0}, "before_scoring": [], "stop": False}

    def sample():
        while not state["stop"]:
            where = "scoring" if state["scoring"] else "training"
            state["peak"][where] = max(state["peak"][where], rss())
            time.sleep(0.01)

    def marked(function):
        def wrapper(*args, **kwargs):
            if not state["scoring"]:
                state["before_scoring"].append(rss())
            state["scoring"] += 1
            try:
                return function(*args, **kwargs)
            finally:
                state["scoring"] -= 1

        return wrapper

    engine._score_requests = marked(engine._score_requests)
    demonstrations.model_embeddings = marked(demonstrations.model_embeddings)
    import trl_ica.scoring.ica as ica

    ica.model_embeddings = demonstrations.model_embeddings
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model, tokenizer = load_model()
    train, holdout, _ = noisy_gsm8k(n, n_holdout, 8, seed=0)
    train = train.remove_columns("corruption")
    lora = recipe_lora(dropout=0.05)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-memory-"),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        max_length=1024,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        logging_steps=steps,
        gradient_checkpointing=True,
    )
    if kind == "stock":
        trainer = SFTTrainer(
            model, args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
        )
    else:
        config = ICASFTConfig(
            **common,
            ica_num_demos=3,
            ica_demo_layout="turns",
            ica_reduction="mean",
            ica_score_form="conditioned",
            ica_weighting="holdout_quantile",
            ica_weight_mode="loss",  # the setting these figures were measured with
            ica_refresh="online" if kind == "ica_online" else "1",
        )
        trainer = ICASFTTrainer(
            model,
            args=config,
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
            peft_config=lora,
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    state["stop"] = True
    thread.join()
    gib = 2**30
    result = {
        "training_peak_gib": state["peak"]["training"] / gib,
        "scoring_peak_gib": state["peak"]["scoring"] / gib if state["peak"]["scoring"] else None,
        "scoring_rise_gib": (state["peak"]["scoring"] - min(state["before_scoring"])) / gib
        if state["before_scoring"]
        else None,
        "budget_tokens": engine.DEFAULT_TOKENS["cpu"],
        "seconds": seconds,
    }
    with open(output, "w") as f:
        json.dump(result, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--n-holdout", type=int, default=24)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--results", default="benchmarks/results/memory.json")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.n, args.n_holdout, args.steps, args.worker[1])
    from benchmarks.common.results import check_settings
    from benchmarks.common.results import load as load_results
    from benchmarks.common.results import save as save_results

    settings = {"n": args.n, "n_holdout": args.n_holdout, "steps": args.steps, "malloc_mmap_threshold": 131072}
    results = load_results(args.results)
    check_settings(results, settings, args.results)  # refuses a file of runs with other settings
    results.setdefault("runs", {})
    for kind in RUNS:
        if kind in results["runs"]:
            continue
        output = os.path.abspath(f"{args.results}.{kind}.tmp")
        command = [
            sys.executable,
            __file__,
            "--n",
            str(args.n),
            "--n-holdout",
            str(args.n_holdout),
            "--steps",
            str(args.steps),
            "--worker",
            kind,
            output,
        ]
        subprocess.run(command, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        results["runs"][kind] = json.load(open(output))
        os.remove(output)
        save_results(results, args.results)
        print(kind, results["runs"][kind], flush=True)
    print("\n".join(results_table(results)))


LABELS = {"stock": "SFTTrainer", "ica_once": "ICASFTTrainer, scored once", "ica_online": "ICASFTTrainer, online"}


def results_table(results: dict) -> list[str]:
    """Per run: the peak resident memory outside and while scoring, against the stock trainer's (for
    `python -m benchmarks.report`)."""
    stock = results["runs"]["stock"]["training_peak_gib"]
    lines = [
        "| run | peak outside scoring (GiB) | x stock | peak while scoring (GiB) | scoring's rise (GiB) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for kind in RUNS:
        run = results["runs"][kind]
        scoring = "" if run["scoring_peak_gib"] is None else f"{run['scoring_peak_gib']:.2f}"
        rise = "" if run["scoring_rise_gib"] is None else f"{run['scoring_rise_gib']:.2f}"
        lines.append(
            f"| {LABELS[kind]} | {run['training_peak_gib']:.2f} | {run['training_peak_gib'] / stock:.2f} | "
            f"{scoring} | {rise} | {run['seconds']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    main()
