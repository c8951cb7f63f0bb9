"""How the benchmarks measure a trained model (clean test loss, exact-match accuracy of greedy answers) and time a
training step."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from trl_ica.cli.assets import gsm8k_final_answer
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.formats import read_dataset
from trl_ica.scoring.rendering import Renderer
from trl_ica.selection.whisperer import final_number


def test_loss(model, tokenizer, test) -> float:
    """Mean NLL per answer token (nats) of the test rows' answers given their prompts."""
    requests = [
        Renderer(tokenizer).unconditioned(e) for e in read_dataset(test.select_columns(["prompt", "completion"]))
    ]
    out = score_requests(model, requests, show_progress=False, distributed="local")
    return float(-out.sums.sum() / out.counts.sum())


@torch.no_grad()
def answers(model, tokenizer, test, max_new_tokens):
    """Greedy answers to the test prompts, batched with left padding (a LoRA adapter is merged first: the weights
    are read once per decoding step, so merged weights and large batches are what make CPU decoding cheap)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in test["prompt"]]
    out = []
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start : start + 32], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def gsm8k_accuracy(model, tokenizer, test) -> float:
    generated = answers(model, tokenizer, test, 256)
    truth = [gsm8k_final_answer(c[-1]["content"]) for c in test["completion"]]
    found = [final_number(g) for g in generated]
    return float(np.mean([f is not None and f == final_number(t) for f, t in zip(found, truth)]))


def reasoning_gym_accuracy(model, tokenizer, test) -> float:
    """Accuracy by each test row's own task's `score_answer` (rows carry `task` and `entry`)."""
    import reasoning_gym

    generated = answers(model, tokenizer, test, 32)
    correct = []
    for text, task, entry in zip(generated, test["task"], test["entry"]):
        checker = reasoning_gym.create_dataset(task, size=1, seed=0)
        number = final_number(text)
        correct.append(checker.score_answer(str(number) if number is not None else text.strip(), json.loads(entry)))
    return float(np.mean(correct))


def evaluate(model, tokenizer, test, checker) -> tuple[float, float]:
    """(clean test loss, exact-match accuracy by `checker.score_answer`) of one reasoning-gym task."""
    loss = test_loss(model, tokenizer, test)
    generated = answers(model, tokenizer, test, 16)
    scores = [checker.score_answer(g.strip(), json.loads(e)) for g, e in zip(generated, test["entry"])]
    return loss, float(np.mean([s == 1.0 for s in scores]))


def median_step(trainer, batches, repeats) -> float:
    """Median wall time of one optimizer step's micro-batches through the trainer's own `get_batch_samples` and
    `training_step` (no optimizer update), over `repeats` steps after a warm-up."""
    model = trainer.model
    model.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        samples, num_items = trainer.get_batch_samples(iter([dict(b) for b in batches]), len(batches), model.device)
        trainer.current_gradient_accumulation_steps = len(samples)
        for inputs in samples:
            trainer.training_step(model, inputs, num_items)
        times.append(time.perf_counter() - start)
        model.zero_grad()
    return statistics.median(times[1:])
