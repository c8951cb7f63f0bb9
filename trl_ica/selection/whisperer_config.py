"""The settings of Data Whisperer ([`trl_ica.selection.whisperer`]), on their own so that the prompt builder
([`trl_ica.selection.prompts`]) and the algorithm both read them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from ..scoring.demonstrations import check_choice
from .metrics import METRICS

INSTRUCTION = (
    "Here are some examples of questions with their answers. After the examples come new questions. Answer every "
    "new question in order, in the same style as the examples. Start each answer with 'Answer N:' where N is the "
    "question's number, and leave a blank line after each answer.\n\n"
)


@dataclass
class WhispererConfig:
    """Settings of [`whisperer_scores`].

    Args:
        num_demos (`int`): n_d, demonstrations per prompt (the paper's default 10).
        num_queries (`int`): n_q, questions answered per prompt (default 5).
        min_demo_count (`int`): prompts are drawn until every example has been a demonstration this many times.
        metric (`str`):
            How an answer is scored against its reference: `"exact_match"` of the final number (GSM8K style,
            `#### 1,234` and `1234` are equal), `"rouge_l"` (ROUGE-L F1, from the `rouge-score` package), or
            `"log_likelihood"`: no generation; the reference answers are read after the prompt and a question scores
            `exp(mean log p)` of its answer tokens, in (0, 1]. Cheaper, smoother, fewer ties.
        layer (`int`, *optional*): decoder layer whose attention weights the demonstrations; default the middle one.
        max_new_tokens (`int`, *optional*):
            Generation budget per prompt; default 1.5 x the summed reference lengths of the batch's queries + 16.
        batch_size (`int`): prompts per forward.
        seed (`int`): seed of the random draws.
        instruction (`str`): text before the demonstrations, shared (and run once) by every prompt.
    """

    num_demos: int = 10
    num_queries: int = 5
    min_demo_count: int = 1
    metric: str = "exact_match"
    layer: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 8
    seed: int = 0
    instruction: str = INSTRUCTION

    def __post_init__(self):
        check_choice("metric", self.metric, METRICS)
        for name in ("num_demos", "num_queries", "min_demo_count", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be positive, got {self.max_new_tokens!r}.")
