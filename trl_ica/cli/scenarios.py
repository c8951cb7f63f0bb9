"""Real-data scenarios built from the offline GSM8K split: a noisy training pool with a clean holdout."""

from __future__ import annotations

import random

import numpy as np
from datasets import Dataset

from .assets import gsm8k_final_answer, load_gsm8k

CORRUPTIONS = ("wrong_answer", "other_question", "truncated")


def chat_row(question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def _corrupt(kind: str, answer: str, other: str, rng: random.Random) -> str:
    if kind == "wrong_answer":  # the worked solution stays, the final number is wrong
        body, final = answer.rsplit("####", 1)
        value = gsm8k_final_answer(final)
        try:
            wrong = int(float(value)) + rng.choice([-1, 1]) * rng.randint(1, max(2, abs(int(float(value))) // 2 + 1))
        except ValueError:
            wrong = rng.randint(1, 100)
        return f"{body}#### {wrong}"
    if kind == "other_question":  # a fluent, correct solution of another problem
        return other
    lines = answer.split("\n")  # truncated: the first half of the reasoning, no final answer
    return "\n".join(lines[: max(1, len(lines) // 2)])


def _shuffled(needed: int, seed: int):
    """GSM8K rows, a seeded order of them and the generator, checking that `needed` problems exist."""
    rows = load_gsm8k()
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if needed > len(order):
        raise ValueError(f"n_train + n_holdout + n_test must be at most {len(order)}, got {needed}.")
    return rows, order, rng


def noisy_gsm8k(n_train: int = 120, n_holdout: int = 24, n_test: int = 48, noise: float = 0.4, seed: int = 0):
    """Disjoint GSM8K train / holdout / test splits; a `noise` share of the train rows are corrupted.

    Returns `(train, holdout, test)` datasets in TRL's conversational prompt/completion format. `train` has a
    `corruption` column: `"clean"` or one of [`CORRUPTIONS`] (evenly mixed).
    """
    rows, order, rng = _shuffled(n_train + n_holdout + n_test, seed)
    train_ids = order[:n_train]
    holdout_ids = order[n_train : n_train + n_holdout]
    test_ids = order[n_train + n_holdout : n_train + n_holdout + n_test]
    noisy = set(rng.sample(range(n_train), round(noise * n_train)))
    train = []
    for position, i in enumerate(train_ids):
        q, a = rows[i]["question"], rows[i]["answer"]
        kind = "clean"
        if position in noisy:
            kind = CORRUPTIONS[len([p for p in noisy if p < position]) % len(CORRUPTIONS)]
            a = _corrupt(kind, a, rows[order[-1 - position]]["answer"], rng)
        train.append({**chat_row(q, a), "corruption": kind})
    holdout = [chat_row(rows[i]["question"], rows[i]["answer"]) for i in holdout_ids]
    test = [chat_row(rows[i]["question"], rows[i]["answer"]) for i in test_ids]
    return Dataset.from_list(train), Dataset.from_list(holdout), Dataset.from_list(test)


def auroc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` labels (ties count one half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auroc needs at least one positive and one negative example.")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def pair_row(question: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


PAIR_CORRUPTIONS = ("wrong_answer", "truncated")


def noisy_gsm8k_pairs(n_train: int = 48, n_holdout: int = 16, n_test: int = 24, flip: float = 0.4, seed: int = 0):
    """GSM8K preference pairs: the reference solution against a corrupted one (a wrong final number or the first half
    of the solution, alternating); in a `flip` share of the training pairs chosen and rejected are swapped.

    Returns `(train, holdout, test)` datasets in TRL's conversational preference format, on disjoint problems.
    `train` has a `flipped` column (bool); holdout and test pairs are all correct.
    """
    rows, order, rng = _shuffled(n_train + n_holdout + n_test, seed)
    flipped = set(rng.sample(range(n_train), round(flip * n_train)))

    def pairs(ids, start):
        out = []
        for position, i in enumerate(ids, start):
            kind = PAIR_CORRUPTIONS[position % len(PAIR_CORRUPTIONS)]
            good = rows[i]["answer"]
            out.append(pair_row(rows[i]["question"], good, _corrupt(kind, good, good, rng)))
        return out

    train = pairs(order[:n_train], 0)
    for position in flipped:
        row = train[position]
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    train = [{**row, "flipped": position in flipped} for position, row in enumerate(train)]
    holdout = pairs(order[n_train : n_train + n_holdout], n_train)
    test = pairs(order[n_train + n_holdout : n_train + n_holdout + n_test], n_train + n_holdout)
    return Dataset.from_list(train), Dataset.from_list(holdout), Dataset.from_list(test)


#: Task settings of [`reasoning_gym_label_noise`]: small numbers, so the answers are a few tokens.
LABEL_NOISE_TASKS = {"basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)}
#: The kinds of noise of [`reasoning_gym_label_noise`], and what a noisy row has instead of its own answer.
LABEL_NOISE_KINDS = {
    "other_task": "answers of another task",
    "shuffled": "answers of other questions",
    "mixture": "the question and answer of another task",
}


def reasoning_gym_label_noise(
    task: str = "basic_arithmetic",
    noise_task="family_relationships",
    noise: float = 0.5,
    noise_kind: str = "other_task",
    n_train: int = 400,
    n_holdout: int = 32,
    n_test: int = 128,
    seed: int = 0,
):
    """SFT label noise that hurts: a reasoning-gym `task` (default: one-digit sums) whose training pool has a `noise`
    share of its answers replaced, by answers of `noise_task` (`noise_kind="other_task"`: the wrong kind of answer,
    as when a pipeline mixes its sources) or by the answers of other questions of the same task (`"shuffled"`:
    wrong answers of the right kind), or has that share of its rows replaced whole, question and answer, by rows of
    `noise_task` (`"mixture"`: a task mixture in which `task` is the target; `noise_task` may then name several
    tasks, as a sequence or separated by commas, which take turns). The holdout and test rows are clean and disjoint
    from the pool.

    Returns `(train, holdout, test, clean)`: conversational prompt/completion datasets (test rows carry `entry`, the
    generator's row as JSON, for the task's own `score_answer`) and the boolean mask of the pool's clean rows.
    """
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError("reasoning_gym_label_noise needs `reasoning-gym` (pip install 'trl_ica[bench]').") from error
    import json

    if noise_kind not in LABEL_NOISE_KINDS:
        raise ValueError(f"`noise_kind` must be one of {list(LABEL_NOISE_KINDS)}, got {noise_kind!r}.")
    if not 0 <= noise <= 1:
        raise ValueError(f"`noise` must be in [0, 1], got {noise!r}.")
    others = noise_task.split(",") if isinstance(noise_task, str) else list(noise_task)
    if not others or not all(others) or (noise_kind == "other_task" and len(others) != 1):
        allowed = "one task" if noise_kind == "other_task" else "one task or several"
        raise ValueError(f"`noise_task` must name {allowed} for noise_kind={noise_kind!r}, got {noise_task!r}.")
    config = LABEL_NOISE_TASKS.get(task, {})
    entries = list(reasoning_gym.create_dataset(task, size=n_train + n_holdout + n_test, seed=seed, **config))
    train, holdout = entries[:n_train], entries[n_train : n_train + n_holdout]
    test = entries[n_train + n_holdout :]
    rng = random.Random(seed)
    noisy = set(rng.sample(range(n_train), round(noise * n_train)))
    questions = {}
    if noise_kind == "other_task":
        other = [str(e["answer"]) for e in reasoning_gym.create_dataset(others[0], size=n_train, seed=seed)]
    elif noise_kind == "mixture":  # whole rows of the other tasks, in turn
        pools = [
            list(reasoning_gym.create_dataset(t, size=n_train, seed=seed * 1000 + j)) for j, t in enumerate(others)
        ]
        picked = {i: pools[j % len(pools)][j // len(pools)] for j, i in enumerate(sorted(noisy))}
        questions = {i: e["question"] for i, e in picked.items()}
        other = {i: str(e["answer"]) for i, e in picked.items()}
    else:  # each noisy row gets the answer of another noisy row, one that differs from its own
        order = sorted(noisy)
        answers = [str(train[i]["answer"]) for i in order]
        for _ in range(100):
            rng.shuffle(answers)
            if all(a != str(train[i]["answer"]) for i, a in zip(order, answers)):
                break
        other = dict(zip(order, answers))
    rows = [
        chat_row(questions.get(i, e["question"]), other[i] if i in noisy else str(e["answer"]))
        for i, e in enumerate(train)
    ]
    clean = np.array([i not in noisy for i in range(n_train)])
    test = Dataset.from_list([{**chat_row(e["question"], str(e["answer"])), "entry": json.dumps(e)} for e in test])
    holdout = Dataset.from_list([chat_row(e["question"], str(e["answer"])) for e in holdout])
    return Dataset.from_list(rows), holdout, test, clean
