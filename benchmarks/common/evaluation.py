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


def timed_training(trainer) -> np.ndarray:
    """Train `trainer` and return the wall seconds of each optimizer step (the first from the start of training, so
    it holds whatever happens before the first step)."""
    from transformers import TrainerCallback

    marks = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    return np.diff(marks)


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


@torch.no_grad()
def gsm8k_answer_metrics(model, tokenizer, test, batch_size: int = 16) -> dict[str, float]:
    """Three teacher-forced measures of the gold test solutions, from one forward of each rendered test row:

    - `loss`: mean NLL per answer token (nats), the closing token included, as training scores it;
    - `span_loss`: mean NLL per token of the final-answer line (`#### N`) given the gold solution before it: what a
      wrong final number in training teaches, which the full-answer mean dilutes over ~130 tokens;
    - `early_end`: the mean probability of the closing token (the chat template's end of turn) at each line end of
      the solution before its last line: what training on truncated solutions teaches.
    Rows are rendered with the chat template as SFT trains them; the positions come from the tokenizer's character
    offsets (a line end is the token that ends where a newline starts)."""
    model.eval()
    device = next(model.parameters()).device
    close = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    totals = dict(loss=[0.0, 0], span_loss=[0.0, 0], early_end=[0.0, 0])
    rows = list(zip(test["prompt"], test["completion"]))
    for start in range(0, len(rows), batch_size):
        encoded = []
        for prompt, completion in rows[start : start + batch_size]:
            answer = completion[-1]["content"]
            head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            if not text.startswith(head + answer):
                raise ValueError("The chat template does not render the answer right after the generation prompt.")
            enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
            encoded.append((enc["input_ids"], enc["offset_mapping"], len(head), answer))
        width = max(len(ids) for ids, *_ in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([x[0] + [pad] * (width - len(x[0])) for x in encoded], device=device)
        mask = torch.tensor([[1] * len(x[0]) + [0] * (width - len(x[0])) for x in encoded], device=device)
        # logits from the earliest answer token of the batch on (the system turn and questions need none)
        first = min(next(i for i, (a, _) in enumerate(x[1]) if a >= x[2]) for x in encoded) - 1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
        for row, (tokens, offsets, begin, answer) in enumerate(encoded):
            logp = _Shifted(logits[row], first)
            end = begin + len(answer)
            # the answer's tokens and its closing token: every token from the answer's start to the first close
            answer_pos = [i for i, (a, _) in enumerate(offsets) if a >= begin]
            answer_pos = answer_pos[: next(k for k, i in enumerate(answer_pos) if tokens[i] == close) + 1]
            span_start = begin + answer.rfind("####") if "####" in answer else end
            nll = [-float(logp(i - 1)[tokens[i]]) for i in answer_pos]
            totals["loss"][0] += sum(nll)
            totals["loss"][1] += len(nll)
            span = [v for i, v in zip(answer_pos, nll) if span_start <= offsets[i][0] < end]
            totals["span_loss"][0] += sum(span)
            totals["span_loss"][1] += len(span)
            line_ends = {begin + k for k, ch in enumerate(answer[: answer.rfind("\n")]) if ch == "\n"}
            ends = [i for i in answer_pos if offsets[i][1] in line_ends and offsets[i][0] < offsets[i][1]]
            for i in ends:
                totals["early_end"][0] += float(logp(i)[close].exp())
                totals["early_end"][1] += 1
    return {k: (s / n if n else float("nan")) for k, (s, n) in totals.items()}


class _Shifted:
    """Log-probabilities of the next token at a position of the full sequence, from logits that start at `first`."""

    def __init__(self, logits, first: int):
        self.logits, self.first = logits, first

    def __call__(self, position: int) -> torch.Tensor:
        return torch.log_softmax(self.logits[position - self.first].float(), dim=-1)
