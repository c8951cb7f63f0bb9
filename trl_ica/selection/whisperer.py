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
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from .. import seams
from ..scoring.formats import PreferenceExample, read_dataset
from ..scoring.models import backbone_and_head, eval_mode, execution_device, head_log_probs, pad_id
from .attention import AttentionProbe
from .metrics import AnswersDone, Metric, final_number, split_answers
from .prompts import build_prompts, credit, demo_weights
from .whisperer_config import WhispererConfig

__all__ = ["WhispererConfig", "WhispererResult", "whisperer_scores", "final_number", "split_answers", "build_prompts"]


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


def whisperer_scores(
    model, tokenizer, dataset, holdout=None, config: WhispererConfig | None = None, *, show_progress: bool = True
) -> WhispererResult:
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
    if pool[0].language_modeling or hasattr(pool[0], "ids"):
        raise ValueError(
            "`method='whisperer'` asks the model to answer questions: it needs rows with a question and an answer "
            "(prompt/completion or `messages`), not language-modeling text or pre-tokenised ids."
        )
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
    metric = Metric(config.metric)
    metric.check_references(queries, "holdout" if holdout is not None else "dataset")

    lm, backbone, head = backbone_and_head(model)
    layers = seams.decoder_layers(backbone)
    layer = len(layers) // 2 if config.layer is None else config.layer
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"`layer` must be in [0, {len(layers) - 1}] for this model, got {config.layer!r}.")
    text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    max_positions = getattr(text_config, "max_position_embeddings", None)

    teacher_forced = config.metric == "log_likelihood"
    builder, prompts = build_prompts(tokenizer, pool, queries if holdout is not None else None, config)

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    # Generation budgets come from the reference answers' lengths: tokenise each reference once, not per prompt
    reference_lengths = [] if teacher_forced else [len(builder.renderer.ids(q.response)) for q in queries]
    device = execution_device(model)
    probe = AttentionProbe(layers[layer].self_attn)
    totals = np.zeros(len(pool), dtype=np.float64)
    counts = np.zeros(len(pool), dtype=np.int64)
    result = WhispererResult(totals, counts, layer)
    order = sorted(range(len(prompts)), key=lambda p: -len(prompts[p].ids))
    bar = tqdm(total=len(prompts), desc=f"Data Whisperer ({config.metric})", disable=not show_progress)
    with torch.no_grad(), eval_mode(model), probe.installed():
        prefix_ids = torch.tensor([builder.prefix], device=device)
        prefix_cache = seams.full_cache()  # every position, sliding-window layers too (see `seams.full_cache`)
        backbone(input_ids=prefix_ids, use_cache=True, **{seams.cache_argument(backbone): prefix_cache})
        prefix_layers = seams.cache_key_values(prefix_cache)
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
            ids = torch.full((B, L), pad_id(lm), dtype=torch.long, device=device)
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
            cache = seams.shared_prefix_cache(prefix_layers, B)
            probe.arm(full_mask, query_rows, spans)
            if teacher_forced:
                query_scores = _teacher_forced(lm, backbone, head, ids, full_mask, cache, P, batch, L)
            else:
                query_scores = _generated(
                    lm,
                    tok,
                    torch.cat([prefix_ids.expand(B, -1), ids], dim=1),
                    full_mask,
                    cache,
                    budget,
                    batch,
                    queries,
                    metric,
                    config.num_queries,
                    result,
                )
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
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=positions,
        use_cache=True,
        **{seams.cache_argument(backbone): cache},
    ).last_hidden_state
    out = []
    for b, p in enumerate(batch):
        pad = L - len(p.ids)
        scores = []
        for s, e in p.answer_spans:
            lp = head_log_probs(lm, head, hidden[b, pad + s - 1 : pad + e - 1], ids[b, pad + s : pad + e])
            scores.append(math.exp(float(lp.double().mean())))
        out.append(scores)
    return out


def _generated(lm, tok, input_ids, full_mask, cache, budget, batch, queries, metric, num_queries, result):
    """One greedy generation per prompt; each question's answer scored against its reference (0 if missing)."""
    eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    out = lm.generate(
        input_ids=input_ids,
        attention_mask=full_mask,
        **{seams.cache_argument(lm): cache},
        do_sample=False,
        max_new_tokens=budget,
        pad_token_id=pad_id(lm),
        eos_token_id=eos if eos is not None else tok.eos_token_id,
        stopping_criteria=StoppingCriteriaList([AnswersDone(tok, input_ids.shape[1], num_queries)]),
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
