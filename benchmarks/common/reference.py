"""Data Whisperer the straightforward way, as its authors' code does it: the reference that `benchmarks.whisperer`
times trl_ica against and tests/test_whisperer.py checks it with."""

import torch


@torch.no_grad()
def naive_whisperer(model, tokenizer, pool, queries, prompts, builder, metric, num_queries, layer, max_new_tokens):
    """Data Whisperer the straightforward way, as its authors' code does it: for each prompt on its own, HF `generate`
    over the whole prompt, then a second forward with eager attention returning every layer's attention matrix, and
    full-vocabulary logits for the log-likelihood metric. Returns (scores, records)."""
    import numpy as np

    from trl_ica.selection.whisperer import credit, demo_weights, split_answers

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    implementation = lm.config._attn_implementation
    totals, counts, records = np.zeros(len(pool)), np.zeros(len(pool), dtype=np.int64), []
    P = len(builder.prefix)
    for prompt in prompts:
        ids = torch.tensor([list(builder.prefix) + prompt.ids])
        record = {"demos": prompt.demos, "queries": prompt.queries}
        if metric != "log_likelihood":
            generated = model.generate(
                input_ids=ids,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            text = "Answer 1:" + tok.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            answers = split_answers(text, num_queries)
            record["generation"] = text
            record["query_scores"] = [
                0.0 if a is None else metric(a, queries[i].response) for a, i in zip(answers, prompt.queries)
            ]
        lm.set_attn_implementation("eager")
        try:
            out = model(input_ids=ids, output_attentions=True)
        finally:
            lm.set_attn_implementation(implementation)
        attention = out.attentions[layer][0].double().sum(0)  # (T, T), summed over heads
        rows = attention[P + prompt.query_start : P + prompt.query_end]
        record["weights"] = demo_weights([rows[:, P + s : P + e].sum().item() / (e - s) for s, e in prompt.spans])
        if metric == "log_likelihood":
            logp = out.logits[0].double().log_softmax(-1)
            record["query_scores"] = [
                float(np.exp(np.mean([logp[P + t - 1, ids[0, P + t]].item() for t in range(s, e)])))
                for s, e in prompt.answer_spans
            ]
        credit(record, totals, counts)
        records.append(record)
    return totals / counts, records
