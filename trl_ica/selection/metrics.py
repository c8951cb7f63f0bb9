"""How Data Whisperer reads and scores the answers of a generation: the final number, the answer to each question,
the metric against the reference and the stopping rule of the generation."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import torch
from transformers import StoppingCriteria

from ..scoring.formats import SFTExample

METRICS = ("exact_match", "rouge_l", "log_likelihood")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> Decimal | None:
    """The answer's final number: the first after the last `####` if there is one, else the last in the text.
    Thousands separators and a trailing period are ignored (`"#### 1,234."` -> 1234); `None` if there is none."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        candidate = found[0] if found else None
    else:
        found = _NUMBER.findall(text)
        candidate = found[-1] if found else None
    if candidate is None:
        return None
    try:
        return Decimal(candidate.replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def split_answers(text: str, num_queries: int) -> list[str | None]:
    """The answer to each of `num_queries` questions in a generation `"Answer 1: ...\\n\\nAnswer 2: ..."`; an answer
    runs to the next marker or blank line. `None` where a question has no answer."""
    marks = list(re.finditer(r"Answer\s*(\d+)\s*:", text))
    answers: list[str | None] = [None] * num_queries
    for n, mark in enumerate(marks):
        number = int(mark.group(1))
        end = marks[n + 1].start() if n + 1 < len(marks) else len(text)
        body = text[mark.end() : end].strip().split("\n\n")[0].strip()
        if 1 <= number <= num_queries and answers[number - 1] is None and body:
            answers[number - 1] = body
    return answers


class Metric:
    def __init__(self, name: str):
        self.name = name
        if name == "rouge_l":
            try:
                from rouge_score import rouge_scorer
            except ImportError as error:  # pragma: no cover - it is a dependency
                raise ImportError("`metric='rouge_l'` needs the `rouge-score` package.") from error
            self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def check_references(self, examples: list[SFTExample], argument: str) -> None:
        if self.name != "exact_match":
            return
        bad = [i for i, e in enumerate(examples) if final_number(e.response) is None]
        if bad:
            raise ValueError(
                f"`metric='exact_match'` needs a final number in every response, but {len(bad)} rows of `{argument}` "
                f"have none (rows {bad[:5]}); use `metric='rouge_l'` or `'log_likelihood'` for such data."
            )

    def __call__(self, answer: str, reference: str) -> float:
        if self.name == "exact_match":
            predicted = final_number(answer)
            return float(predicted is not None and predicted == final_number(reference))
        return float(self._rouge.score(reference, answer)["rougeL"].fmeasure)


class AnswersDone(StoppingCriteria):
    """Stops a row once nothing more it writes can be parsed as an answer: it has started an answer after the last
    question, finished the last answer (a blank line after it), or written two blank-line separated blocks with no
    new `Answer N:` marker (it has left the format)."""

    def __init__(self, tokenizer, start: int, num_queries: int):
        self.tokenizer, self.start, self.num_queries = tokenizer, start, num_queries

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids[:, self.start :]:
            text = "Answer 1:" + self.tokenizer.decode(row, skip_special_tokens=True)
            marks = list(re.finditer(r"Answer\s*(\d+)\s*:", text))
            tail = text[marks[-1].end() :].lstrip()
            blocks = tail.count("\n\n")
            last = int(marks[-1].group(1))
            done.append(last > self.num_queries or blocks >= 2 or (blocks >= 1 and last == self.num_queries))
        return torch.tensor(done, device=input_ids.device)
