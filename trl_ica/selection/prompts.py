"""Data Whisperer's prompts: which rows are demonstrations and queries of each prompt, their tokens, and how a prompt's
score is credited to its demonstrations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..scoring.formats import SFTExample
from ..scoring.rendering import Renderer

if TYPE_CHECKING:
    from .whisperer_config import WhispererConfig


@dataclass
class Prompt:
    demos: list[int]
    queries: list[int]
    ids: list[int] = field(default_factory=list)  # after the shared instruction
    spans: list[tuple[int, int]] = field(default_factory=list)  # demo spans within `ids`
    query_start: int = 0  # the query section (the questions) is `ids[query_start:query_end]`
    query_end: int = 0
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # log_likelihood: reference spans in `ids`
    record: dict = field(default_factory=dict)

    def __post_init__(self):
        self.record.update(demos=self.demos, queries=self.queries)


def demo_weights(attention: list[float]) -> list[float]:
    """Per-demo attention (already divided by length) normalised to sum to 1; uniform if it is all zero."""
    total = sum(attention)
    return [a / total for a in attention] if total > 0 else [1 / len(attention)] * len(attention)


def credit(record: dict, totals: np.ndarray, counts: np.ndarray) -> None:
    """Add the prompt's mean query score, weighted per demonstration, to its demonstrations' running sums."""
    value = float(np.mean(record["query_scores"]))
    for i, w in zip(record["demos"], record["weights"]):
        totals[i] += value * w
        counts[i] += 1


def plan_prompts(n: int, num_demos: int, num_queries: int, min_demo_count: int, rng, query_pool: int | None):
    """Random prompts: each round shuffles the pool and cuts it into groups of `num_demos` demonstrations (a short
    last group is filled with other random examples), so every example is a demonstration once per round; each
    prompt's queries are drawn from the holdout (`query_pool` rows) or else from the pool rows not among its demos."""
    prompts = []
    for _ in range(min_demo_count):
        order = rng.permutation(n)
        for start in range(0, n, num_demos):
            demos = [int(i) for i in order[start : start + num_demos]]
            if len(demos) < num_demos:
                rest = np.setdiff1d(np.arange(n), demos)
                demos += [int(i) for i in rng.choice(rest, num_demos - len(demos), replace=False)]
            if query_pool is not None:
                queries = rng.choice(query_pool, num_queries, replace=False)
            else:
                queries = rng.choice(np.setdiff1d(np.arange(n), demos), num_queries, replace=False)
            prompts.append(Prompt(demos, [int(q) for q in queries]))
    return prompts


class PromptBuilder:
    def __init__(self, tokenizer, conversational: bool, instruction: str):
        self.renderer = Renderer(tokenizer)
        if conversational:
            pieces = self.renderer.pieces(SFTExample([{"role": "user", "content": "x"}], "", "x"))
            head, self.mid = pieces.head, pieces.mid
            self.prefix = self.renderer.ids(head + instruction)
        else:
            self.mid = ""
            self.prefix = self.renderer.bos + self.renderer.ids(instruction)
        if not self.prefix:
            raise ValueError("`instruction` is empty and the tokenizer adds no leading token; give an instruction.")

    def build(self, prompt: Prompt, pool: list[SFTExample], queries: list[SFTExample], teacher_forced: bool):
        ids: list[int] = []
        for j, i in enumerate(prompt.demos):
            start = len(ids)
            ids += self.renderer.ids(f"Example {j + 1}:\nQuestion: {pool[i].question}\nAnswer: {pool[i].response}\n\n")
            prompt.spans.append((start, len(ids)))
        prompt.query_start = len(ids)
        listed = "".join(f"Question {q + 1}: {queries[i].question}\n" for q, i in enumerate(prompt.queries))
        ids += self.renderer.ids("New questions:\n" + listed + self.mid)
        prompt.query_end = len(ids)
        if teacher_forced:
            for q, i in enumerate(prompt.queries):
                ids += self.renderer.ids(f"Answer {q + 1}: ")
                start = len(ids)
                ids += self.renderer.ids(queries[i].response)
                prompt.answer_spans.append((start, len(ids)))
                ids += self.renderer.ids("\n\n")
        else:
            ids += self.renderer.ids("Answer 1:")
        prompt.ids = ids


def build_prompts(tokenizer, pool: list[SFTExample], holdout: list[SFTExample] | None, config: WhispererConfig):
    """The shared instruction and every prompt (token ids, demo spans, query section) in drawing order."""
    rng = np.random.default_rng(config.seed)
    prompts = plan_prompts(
        len(pool),
        config.num_demos,
        config.num_queries,
        config.min_demo_count,
        rng,
        len(holdout) if holdout is not None else None,
    )
    builder = PromptBuilder(tokenizer, pool[0].conversational, config.instruction)
    for prompt in prompts:
        builder.build(prompt, pool, holdout if holdout is not None else pool, config.metric == "log_likelihood")
    return builder, prompts
