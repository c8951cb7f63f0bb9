"""Which short-answer task can a CPU quality benchmark use? SmolLM2-135M-Instruct untrained, clean- and noisy-trained.

For a reasoning-gym task: the clean test loss (nats/token) and the accuracy by the task's own `score_answer` of greedy
answers, for the untrained model, after stock SFT on clean rows, and after stock SFT on the same rows with a
`--noise` share of answers replaced by another row's answer. LoRA on the top `--top-layers` layers only, so a step
costs little more than a forward. A task is worth benchmarking only if clean training raises accuracy clearly and
noise costs a clear part of that.

    python -m benchmarks.run benchmarks/experiments/task_pilot/pilots.json [--methods basic_arithmetic/other_row]

A pilot (a "method" of the experiment) is `<task>/<noise kind>`: the noise kind is `other_row` or another
reasoning-gym task's name. Each finished (pilot, seed) is kept in the results file, written whole, and skipped when
run again; a file made with other settings is refused.
"""

import argparse
import json
import random
import tempfile
import time
import warnings

import numpy as np
from datasets import Dataset

from benchmarks.common.evaluation import evaluate
from benchmarks.common.models import load_model, top_layer_lora, training_settings
from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from benchmarks.run import main as run_main
from trl_ica.cli.scenarios import LABEL_NOISE_TASKS as TASK_CONFIGS  # small numbers: short answers
from trl_ica.cli.scenarios import chat_row

warnings.filterwarnings("ignore")


def make_data(task, n_train, n_test, noise, seed, noise_kind="other_row"):
    import reasoning_gym

    config = TASK_CONFIGS.get(task, {})
    entries = list(reasoning_gym.create_dataset(task, size=n_train + n_test, seed=seed, **config))
    train, test = entries[:n_train], entries[n_train:]
    rng = random.Random(seed)
    if noise_kind == "other_row":  # another row's answer of the same task: in format, wrong
        pool = [str(e["answer"]) for e in train]
    else:  # an answer of another task: the wrong kind of answer (a pipeline that mixed up its sources)
        pool = [str(e["answer"]) for e in reasoning_gym.create_dataset(noise_kind, size=n_train, seed=seed + 1)]
    clean = [chat_row(e["question"], str(e["answer"])) for e in train]
    noisy = []
    for e in train:
        answer = str(e["answer"])
        if rng.random() < noise:  # another row's answer: fluent, in format, wrong
            answer = rng.choice([a for a in pool if a != answer] or [answer + "0"])
        noisy.append(chat_row(e["question"], answer))
    test = Dataset.from_list([{**chat_row(e["question"], str(e["answer"])), "entry": json.dumps(e)} for e in test])
    checker = reasoning_gym.create_dataset(task, size=1, seed=0, **config)
    return Dataset.from_list(clean), Dataset.from_list(noisy), test, checker


def train(rows, args, seed):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model()
    lora = top_layer_lora(model, args.top_layers)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(**training_settings(out, args, seed))
        trainer = SFTTrainer(model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return trainer.model.eval(), tokenizer, seconds


SETTING_KEYS = ("steps", "batch_size", "lr", "top_layers", "noise", "n_train", "n_test")
#: The pilots: `<task>/<noise kind>` (a new one is added here and to the experiment file).
METHODS = ("family_relationships/other_row", "basic_arithmetic/family_relationships")


def run(settings, pilots, seeds, results_path=None) -> dict:
    """Every (pilot, seed) not yet in `results_path`: the untrained model, then stock SFT on the clean and on the
    noisy rows, each evaluated on the clean test split; written as each pilot finishes."""
    if set(settings) != set(SETTING_KEYS):
        raise SystemExit(f"task_pilot settings are {list(SETTING_KEYS)}, got {sorted(settings)}.")
    args = argparse.Namespace(**settings)
    results = load_results(results_path)
    check_settings(results, dict(settings), results_path)
    for seed in seeds:
        for pilot in pilots:
            if str(seed) in results.get(pilot, {}):
                continue
            task, kind = pilot.split("/")
            clean, noisy, test, checker = make_data(task, args.n_train, args.n_test, args.noise, seed, kind)
            model, tokenizer = load_model()
            out = {
                "before training": dict(zip(("loss", "accuracy"), evaluate(model.eval(), tokenizer, test, checker)))
            }
            for name, rows in zip(TRAINED, (clean, noisy)):
                trained, tokenizer, seconds = train(rows, args, seed)
                loss, accuracy = evaluate(trained, tokenizer, test, checker)
                out[name] = dict(loss=loss, accuracy=accuracy, seconds_per_step=seconds / args.steps)
                print(f"  [seed {seed}] {pilot} {name}: {out[name]}", flush=True)
            results.setdefault(pilot, {})[str(seed)] = out
            save_results(results, results_path)
    return results


def run_experiment(experiment: dict, methods=None, seeds=None, keep_logs="") -> None:
    """An experiment file's pilots (its `methods` and `seeds` unless given), then its table."""
    run(experiment["settings"], methods or experiment["methods"], seeds or experiment["seeds"], experiment["results"])
    print("\n".join(report_table(experiment)))


TRAINED = ("clean", "noisy")


def report_table(experiment: dict) -> list[str]:
    """Per pilot: clean test loss / accuracy before training, after clean and after noisy training, the noise gap
    in loss and the seconds per step of the two trainings, averaged over the kept seeds."""
    results, labels = load_results(experiment["results"]), experiment.get("labels", {})
    lines = [
        "| task (answer) | noise: the replaced answers are | before | clean | noisy | noise gap (loss) | "
        "s/step, clean / noisy | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pilot in experiment["methods"]:
        runs = list(results.get(pilot, {}).values())
        if runs:
            mean = {(p, k): float(np.mean([r[p][k] for r in runs])) for p in runs[0] for k in runs[0][p]}
            task, noise = labels.get(pilot, pilot).split(" | ")
            cells = [f"{mean[p, 'loss']:.3f} / {mean[p, 'accuracy']:.3f}" for p in ("before training", *TRAINED)]
            cells.append(f"{mean['noisy', 'loss'] - mean['clean', 'loss']:+.3f}")
            cells.append(" / ".join(f"{mean[p, 'seconds_per_step']:.1f}" for p in TRAINED))
            lines.append(f"| {task} | {noise} | {' | '.join(cells)} | {len(runs)} |")
    return lines + ["", "(loss / accuracy: clean test loss in nats/token and exact-match accuracy.)"]


def main(argv=None):
    run_main(argv, __doc__, "benchmarks/experiments/task_pilot/pilots.json")


if __name__ == "__main__":
    main()
