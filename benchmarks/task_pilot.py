"""Which short-answer task can a CPU quality benchmark use? SmolLM2-135M-Instruct untrained, clean- and noisy-trained.

For a reasoning-gym task: the clean test loss (nats/token) and the accuracy by the task's own `score_answer` of greedy
answers, for the untrained model, after stock SFT on clean rows, and after stock SFT on the same rows with a
`--noise` share of answers replaced by another row's answer. LoRA on the top `--top-layers` layers only, so a step
costs little more than a forward. A task is worth benchmarking only if clean training raises accuracy clearly and
noise costs a clear part of that.

    python -m benchmarks.task_pilot --task basic_arithmetic --steps 40 [--results benchmarks/results/task_pilot.json]

Each finished (task, settings) result is kept in the JSON file, written whole, and skipped when run again.
"""

import argparse
import json
import os
import random
import tempfile
import time
import warnings

import torch
from datasets import Dataset

from benchmarks.common.evaluation import evaluate
from benchmarks.common.models import top_layer_lora, training_settings
from trl_ica.cli.assets import load_model
from trl_ica.cli.scenarios import LABEL_NOISE_TASKS as TASK_CONFIGS  # small numbers: short answers
from trl_ica.data_io import write_json

warnings.filterwarnings("ignore")


def chat(question, answer):
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


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
    clean = [chat(e["question"], str(e["answer"])) for e in train]
    noisy = []
    for e in train:
        answer = str(e["answer"])
        if rng.random() < noise:  # another row's answer: fluent, in format, wrong
            answer = rng.choice([a for a in pool if a != answer] or [answer + "0"])
        noisy.append(chat(e["question"], answer))
    test = Dataset.from_list([{**chat(e["question"], str(e["answer"])), "entry": json.dumps(e)} for e in test])
    checker = reasoning_gym.create_dataset(task, size=1, seed=0, **config)
    return Dataset.from_list(clean), Dataset.from_list(noisy), test, checker


def train(rows, args):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model()
    lora = top_layer_lora(model, args.top_layers)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(**training_settings(out, args, args.seed))
        trainer = SFTTrainer(model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return trainer.model.eval(), tokenizer, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-layers", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--noise-kind", default="other_row", help="'other_row', or a reasoning-gym task's name.")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    key = (f"{args.task} steps={args.steps} batch={args.batch_size} lr={args.lr} top={args.top_layers} "
           f"noise={args.noise} kind={args.noise_kind} seed={args.seed}")  # fmt: skip
    results = json.load(open(args.results)) if args.results and os.path.isfile(args.results) else {}
    if key in results:
        print(json.dumps({key: results[key]}, indent=1))
        return
    data = make_data(args.task, args.n_train, args.n_test, args.noise, args.seed, args.noise_kind)
    clean, noisy, test, checker = data
    model, tokenizer = load_model()
    out = {"before training": dict(zip(("loss", "accuracy"), evaluate(model.eval(), tokenizer, test, checker)))}
    for name, rows in (("clean", clean), ("noisy", noisy)):
        trained, tokenizer, seconds = train(rows, args)
        loss, accuracy = evaluate(trained, tokenizer, test, checker)
        out[name] = dict(loss=loss, accuracy=accuracy, seconds_per_step=seconds / args.steps)
        print(name, out[name], flush=True)
    results[key] = out
    if args.results:
        write_json(results, args.results)
    print(json.dumps({key: out}, indent=1))


if __name__ == "__main__":
    main()
