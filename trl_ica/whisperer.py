"""Data Whisperer (arXiv 2505.12212): training-free selection by few-shot in-context learning.

Every prompt holds `num_demos` demonstrations from the pool and `num_queries` questions to answer (from the pool, or
from a holdout set when one is given). The model answers all questions in one greedy generation; the prompt's mean
query score `s` is credited to each demonstration `i` as `s * w_i`, where `w_i` is the attention that the query
section pays to demonstration `i` in one layer (summed over heads and query tokens, divided by the demonstration's
length, normalised over the demonstrations). An example's score is the mean over the prompts it was a demonstration
in; prompts are drawn until every example has been one at least `min_demo_count` times.

How this differs from the authors' code, on purpose:
- Demonstrations are random draws that cover the pool round by round, not consecutive chunks.
- The attention comes from the generation's own prompt forward: only the chosen layer's attention is computed, from
  the query tokens only, in float32; no second pass and no eager attention anywhere else.
- The instruction is run once and its KV cache shared by every prompt; prompts are batched by length.
- Numbers with thousands separators parse; scores are float64; an answer that cannot be parsed scores 0 and is
  counted in [`WhispererResult.summary`].
"""

from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .demos import check_choice
from .engine import _backbone_and_head, _head_log_probs, _pad_id, eval_mode
from .formats import PreferenceExample, SFTExample, read_dataset
from .rendering import Renderer

METRICS = ("exact_match", "rouge_l", "log_likelihood")

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


@dataclass
class WhispererResult:
    """Scores (float64, one per pool row) and what happened on the way."""

    scores: np.ndarray
    demo_counts: np.ndarray
    layer: int
    prompts: int = 0
    unparsed_prompts: int = 0
    missing_answers: int = 0
    #: One record per prompt, in drawing order: `demos`, `queries` (row indices), `query_scores`, `weights` (the
    #: normalised attention per demo) and, when generating, `generation` (the decoded answers).
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        values, counts = np.unique(self.scores, return_counts=True)
        return {
            "prompts": self.prompts,
            "layer": self.layer,
            "unparsed_prompts": self.unparsed_prompts,
            "missing_answers": self.missing_answers,
            "mean_prompt_score": float(np.mean([np.mean(r["query_scores"]) for r in self.records])),
            "tied_rows": int(counts[counts > 1].sum()),
            "distinct_scores": int(values.size),
        }


# --- answers -----------------------------------------------------------------------------------------------------

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


class _Metric:
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


# --- attention of the query section to each demonstration, in one layer -------------------------------------------


class _AttentionProbe:
    """Wraps the attention function of one decoder layer; on the next call of that layer it also computes the
    attention that the marked query rows pay to each demonstration span (softmax in float32, summed over heads)."""

    def __init__(self, attention_module):
        self.module = attention_module
        self.request = None
        self.result = None

    @contextmanager
    def installed(self):
        name = self.module.config._attn_implementation
        had_local = name in ALL_ATTENTION_FUNCTIONS._local_mapping
        previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(name)
        original = ALL_ATTENTION_FUNCTIONS.get_interface(name, None) if name != "eager" else None
        if original is None:  # eager: the modeling file's own function
            original = sys.modules[type(self.module).__module__].eager_attention_forward

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module is self.module and self.request is not None:
                self.result = self._demo_attention(query, key, kwargs.get("scaling"), kwargs.get("softcap"))
                self.request = None
            return original(module, query, key, value, attention_mask, **kwargs)

        ALL_ATTENTION_FUNCTIONS[name] = attention
        try:
            yield self
        finally:
            if had_local:
                ALL_ATTENTION_FUNCTIONS[name] = previous
            else:
                del ALL_ATTENTION_FUNCTIONS[name]

    def arm(self, key_mask: torch.Tensor, query_rows: torch.Tensor, spans: list[list[tuple[int, int]]]):
        """key_mask (B, K): valid keys; query_rows (B, Q): the query-section rows of the coming input;
        spans[b]: (start, end) key indices of each demonstration."""
        self.request = (key_mask, query_rows, spans)
        self.result = None

    def _demo_attention(self, query, key, scaling, softcap) -> list[list[float]]:
        key_mask, query_rows, spans = self.request
        B, H, Q, D = query.shape
        K = key.shape[-2]
        if scaling is None:
            scaling = D**-0.5
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        # Query row i sits at key index K - Q + i; it sees valid keys up to itself.
        causal = torch.arange(K, device=key.device)[None, :] <= (K - Q + torch.arange(Q, device=key.device))[:, None]
        out = []
        for b in range(B):
            rows = query_rows[b].nonzero().squeeze(-1)
            logits = (query[b][:, rows].float() @ key[b].float().transpose(-1, -2)) * scaling  # (H, r, K)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            allowed = causal[rows] & key_mask[b].bool()[None, :]
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
            per_key = probs.sum(dim=(0, 1))  # (K,)
            out.append([float(per_key[s:e].sum()) / (e - s) for s, e in spans[b]])
        return out


def _decoder_layers(backbone):
    layers = getattr(backbone, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn"):
        raise ValueError(f"{type(backbone).__name__} has no `layers[i].self_attn`; Data Whisperer cannot read it.")
    return layers


# --- prompts -------------------------------------------------------------------------------------------------------


@dataclass
class _Prompt:
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
            prompts.append(_Prompt(demos, [int(q) for q in queries]))
    return prompts


class _PromptBuilder:
    def __init__(self, tokenizer, conversational: bool, instruction: str):
        self.renderer = Renderer(tokenizer)
        if conversational:
            pieces = self.renderer._pieces(SFTExample([{"role": "user", "content": "x"}], "", "x"))
            head, self.mid = pieces.head, pieces.mid
            self.prefix = self.renderer._ids(head + instruction)
        else:
            self.mid = ""
            self.prefix = self.renderer._bos + self.renderer._ids(instruction)
        if not self.prefix:
            raise ValueError("`instruction` is empty and the tokenizer adds no leading token; give an instruction.")

    def build(self, prompt: _Prompt, pool: list[SFTExample], queries: list[SFTExample], teacher_forced: bool):
        ids: list[int] = []
        for j, i in enumerate(prompt.demos):
            start = len(ids)
            ids += self.renderer._ids(
                f"Example {j + 1}:\nQuestion: {pool[i].question}\nAnswer: {pool[i].response}\n\n"
            )
            prompt.spans.append((start, len(ids)))
        prompt.query_start = len(ids)
        listed = "".join(f"Question {q + 1}: {queries[i].question}\n" for q, i in enumerate(prompt.queries))
        ids += self.renderer._ids("New questions:\n" + listed + self.mid)
        prompt.query_end = len(ids)
        if teacher_forced:
            for q, i in enumerate(prompt.queries):
                ids += self.renderer._ids(f"Answer {q + 1}: ")
                start = len(ids)
                ids += self.renderer._ids(queries[i].response)
                prompt.answer_spans.append((start, len(ids)))
                ids += self.renderer._ids("\n\n")
        else:
            ids += self.renderer._ids("Answer 1:")
        prompt.ids = ids


class _AnswersDone(StoppingCriteria):
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


def build_prompts(tokenizer, pool: list[SFTExample], holdout: list[SFTExample] | None, config: WhispererConfig):
    """The shared instruction and every prompt (token ids, demo spans, query section) in drawing order."""
    rng = np.random.default_rng(config.seed)
    prompts = plan_prompts(
        len(pool), config.num_demos, config.num_queries, config.min_demo_count, rng,
        len(holdout) if holdout is not None else None,
    )  # fmt: skip
    builder = _PromptBuilder(tokenizer, pool[0].conversational, config.instruction)
    for prompt in prompts:
        builder.build(prompt, pool, holdout if holdout is not None else pool, config.metric == "log_likelihood")
    return builder, prompts


# --- the algorithm -------------------------------------------------------------------------------------------------


def whisperer_scores(model, tokenizer, dataset, holdout=None, config: WhispererConfig | None = None, *,
                     show_progress: bool = True) -> WhispererResult:  # fmt: skip
    """Data Whisperer scores of every row of `dataset` (SFT rows); larger is better.

    Args:
        model: the model to be fine-tuned (or a smaller one of its family); PEFT and 4-bit models work.
        tokenizer: its tokenizer.
        dataset: the pool, in a TRL SFT format.
        holdout (*optional*): if given, the questions answered in each prompt come from it; else from the pool.
        config ([`WhispererConfig`]): the settings.
    """
    config = config or WhispererConfig()
    pool = read_dataset(dataset, "dataset")
    if isinstance(pool[0], PreferenceExample):
        raise ValueError("`method='whisperer'` is defined for SFT examples, not for preference pairs.")
    queries = read_dataset(holdout, "holdout") if holdout is not None else pool
    if isinstance(queries[0], PreferenceExample):
        raise ValueError("The Data Whisperer holdout must hold SFT examples, not preference pairs.")
    if holdout is None and len(pool) < config.num_demos + config.num_queries:
        raise ValueError(
            f"`dataset` has {len(pool)} rows, fewer than num_demos + num_queries = "
            f"{config.num_demos} + {config.num_queries}; lower them or pass a holdout for the queries."
        )
    if len(pool) < config.num_demos:
        raise ValueError(f"`dataset` has {len(pool)} rows, fewer than `num_demos`={config.num_demos}.")
    if holdout is not None and len(queries) < config.num_queries:
        raise ValueError(f"`holdout` has {len(queries)} rows, fewer than `num_queries`={config.num_queries}.")
    metric = _Metric(config.metric)
    metric.check_references(queries, "holdout" if holdout is not None else "dataset")

    lm, backbone, head = _backbone_and_head(model)
    layers = _decoder_layers(backbone)
    layer = len(layers) // 2 if config.layer is None else config.layer
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"`layer` must be in [0, {len(layers) - 1}] for this model, got {config.layer!r}.")
    text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    max_positions = getattr(text_config, "max_position_embeddings", None)

    teacher_forced = config.metric == "log_likelihood"
    builder, prompts = build_prompts(tokenizer, pool, queries if holdout is not None else None, config)

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    # Generation budgets come from the reference answers' lengths: tokenise each reference once, not per prompt
    reference_lengths = [] if teacher_forced else [len(builder.renderer._ids(q.response)) for q in queries]
    device = next(p for p in model.parameters()).device
    probe = _AttentionProbe(layers[layer].self_attn)
    totals = np.zeros(len(pool), dtype=np.float64)
    counts = np.zeros(len(pool), dtype=np.int64)
    result = WhispererResult(totals, counts, layer)
    order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p].ids))
    bar = tqdm(total=len(prompts), desc=f"Data Whisperer ({config.metric})", disable=not show_progress)
    with torch.no_grad(), eval_mode(model), probe.installed():
        prefix_ids = torch.tensor([builder.prefix], device=device)
        prefix = backbone(input_ids=prefix_ids, use_cache=True)
        prefix_layers = [(layer_.keys, layer_.values) for layer_ in prefix.past_key_values.layers]
        P = prefix_ids.shape[1]
        for start in range(0, len(order), config.batch_size):
            batch = [prompts[p] for p in order[start : start + config.batch_size]]
            B, L = len(batch), max(len(p.ids) for p in batch)
            budget = 0
            if not teacher_forced:
                refs = max(sum(reference_lengths[i] for i in p.queries) for p in batch)
                budget = config.max_new_tokens or int(1.5 * refs) + 16
            if max_positions is not None and P + L + budget > max_positions:
                raise ValueError(
                    f"A prompt needs {P + L + budget} positions ({P + L} prompt + {budget} generated) but the model "
                    f"has {max_positions}; lower `num_demos`/`num_queries` or `max_new_tokens`."
                )
            ids = torch.full((B, L), _pad_id(lm), dtype=torch.long, device=device)
            mask = torch.zeros((B, L), dtype=torch.long, device=device)
            query_rows = torch.zeros((B, L), dtype=torch.bool, device=device)
            spans = []
            for b, p in enumerate(batch):  # left padding inside the batch, after the shared instruction
                pad = L - len(p.ids)
                ids[b, pad:] = torch.tensor(p.ids, device=device)
                mask[b, pad:] = 1
                query_rows[b, pad + p.query_start : pad + p.query_end] = True
                spans.append([(P + pad + s, P + pad + e) for s, e in p.spans])
            full_mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix_layers],
                config=lm.config,
            )
            probe.arm(full_mask, query_rows, spans)
            if teacher_forced:
                query_scores = _teacher_forced(lm, backbone, head, ids, full_mask, cache, P, batch, L)
            else:
                query_scores = _generated(
                    lm, tok, torch.cat([prefix_ids.expand(B, -1), ids], dim=1), full_mask, cache, budget, batch,
                    queries, metric, config.num_queries, result,
                )  # fmt: skip
            attention = probe.result
            if attention is None:
                raise RuntimeError(f"Layer {layer}'s attention was not observed; the model bypassed the probe.")
            for p, s, att in zip(batch, query_scores, attention):
                p.record.update(query_scores=s, weights=demo_weights(att))
            bar.update(B)
    bar.close()
    for p in prompts:
        credit(p.record, totals, counts)
        result.records.append(p.record)
    result.prompts = len(prompts)
    result.scores = totals / counts
    return result


def _teacher_forced(lm, backbone, head, ids, full_mask, cache, P, batch, L) -> list[list[float]]:
    """exp(mean log p) of each reference answer after the prompt."""
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    hidden = backbone(
        input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state
    out = []
    for b, p in enumerate(batch):
        pad = L - len(p.ids)
        scores = []
        for s, e in p.answer_spans:
            lp = _head_log_probs(lm, head, hidden[b, pad + s - 1 : pad + e - 1], ids[b, pad + s : pad + e])
            scores.append(math.exp(float(lp.double().mean())))
        out.append(scores)
    return out


def _generated(lm, tok, input_ids, full_mask, cache, budget, batch, queries, metric, num_queries, result):
    """One greedy generation per prompt; each question's answer scored against its reference (0 if missing)."""
    eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    out = lm.generate(
        input_ids=input_ids,
        attention_mask=full_mask,
        past_key_values=cache,
        do_sample=False,
        max_new_tokens=budget,
        pad_token_id=_pad_id(lm),
        eos_token_id=eos if eos is not None else tok.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_AnswersDone(tok, input_ids.shape[1], num_queries)]),
        temperature=None,
        top_p=None,
        top_k=None,
    )
    scores = []
    for row, p in zip(out[:, input_ids.shape[1] :], batch):
        text = "Answer 1:" + tok.decode(row, skip_special_tokens=True)
        p.record["generation"] = text
        answers = split_answers(text, num_queries)
        if all(a is None for a in answers):
            result.unparsed_prompts += 1
        result.missing_answers += sum(a is None for a in answers)
        scores.append([0.0 if a is None else metric(a, queries[i].response) for a, i in zip(answers, p.queries)])
    return scores
