"""Benchmark-only data: the reasoning-gym task mixture. The scenarios the demo and `trl-ica data` also use are in
`trl_ica.cli.scenarios` (imported from here)."""

from __future__ import annotations

import random

from datasets import Dataset

from trl_ica.cli.scenarios import (  # noqa: F401 - re-exported for the benchmarks
    LABEL_NOISE_KINDS,
    LABEL_NOISE_TASKS,
    auroc,
    chat_row,
    noisy_gsm8k,
    noisy_gsm8k_pairs,
    reasoning_gym_label_noise,
)

#: Reasoning-gym tasks with numeric answers (so exact match applies), in distinct styles.
MIXTURE_TASKS = ("leg_counting", "basic_arithmetic", "chain_sum", "letter_counting", "count_bits")


def reasoning_gym_mixture(
    tasks=MIXTURE_TASKS,
    target: str = "leg_counting",
    n_per_task: int = 16,
    n_holdout: int = 12,
    n_test: int = 24,
    seed: int = 0,
):
    """A pool mixing reasoning-gym tasks, `n_per_task` rows each (a `task` column), plus a holdout and a test split
    of the `target` task, disjoint from its pool rows (one generated dataset split three ways).

    Returns `(train, holdout, test)` in TRL's conversational prompt/completion format. Test rows carry `task` and
    `entry` (the generator's row as JSON) so an answer can be checked with reasoning-gym's own `score_answer`.
    """
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError("reasoning_gym_mixture needs `reasoning-gym` (pip install 'trl_ica[bench]').") from error
    import json

    if target not in tasks:
        raise ValueError(f"`target`={target!r} must be one of `tasks` {list(tasks)}.")
    train, holdout, test = [], [], []
    for t, task in enumerate(tasks):
        extra = n_holdout + n_test if task == target else 0
        entries = list(reasoning_gym.create_dataset(task, size=n_per_task + extra, seed=seed * 1000 + t))
        for entry in entries[:n_per_task]:
            train.append({**chat_row(entry["question"], str(entry["answer"])), "task": task})
        for entry in entries[n_per_task : n_per_task + n_holdout]:
            holdout.append(chat_row(entry["question"], str(entry["answer"])))
        for entry in entries[n_per_task + n_holdout : n_per_task + extra]:
            test.append(
                {**chat_row(entry["question"], str(entry["answer"])), "task": task, "entry": json.dumps(entry)}
            )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    return Dataset.from_list([train[i] for i in order]), Dataset.from_list(holdout), Dataset.from_list(test)
