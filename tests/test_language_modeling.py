"""Language-modeling rows (`text`, a `formatting_func`, `dataset_text_field`): the score is
log p(text | holdout texts) - log p(text), every token scored as SFTTrainer trains on it."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import (
    CPU_ARGS,
    LOGP_ATOL,
    assert_requests_are_the_training_sequences,
    stock_and_ica_sft,
    tiny_llama,
)

from trl_ica import score_ica
from trl_ica.scoring.formats import read_dataset
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.rendering import Renderer

COMMON = dict(CPU_ARGS, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
UNIT_ONLINE = dict(ica_weighting="none", ica_refresh="online")  # every weight 1, the step scored as it trains


def texts(n=12, offset=0):
    return [f"Question: what is {i} plus {i + 1}? Answer: {2 * i + 1}." for i in range(offset, offset + n)]


def model_for(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def naive_logp(model, ids: list[int], scored_from: int) -> float:
    """Summed log-probability of `ids[scored_from:]` given what comes before them, by one plain forward."""
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logits[t - 1, ids[t]] for t in range(scored_from, len(ids))))


def test_text_rows_score_the_whole_text_against_holdout_texts(tokenizer):
    """Each request is what SFTTrainer trains on (the text and EOS, no prompt), with the holdout texts as plain
    few-shot demonstrations before it; the scores equal a naive forward of those token ids."""
    train, holdout = Dataset.from_dict({"text": texts(3)}), Dataset.from_dict({"text": texts(4, offset=20)})
    model = model_for(tokenizer)
    out = score_ica(
        model,
        tokenizer,
        train,
        holdout,
        ICAScoringOptions(num_demos=2, demo_selection="fixed", form="difference", reduction="sum"),
        show_progress=False,
    )
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token
    for row, text in enumerate(texts(3)):
        demos = "".join(f"{holdout[int(i)]['text']}\n\n" for i in out.demo_indices[row])
        whole = ids(text + eos)
        # this tokenizer puts no BOS before text: the first token is never predicted, in training or here
        plain = naive_logp(model, whole, 1)
        conditioned = naive_logp(model, ids(demos) + whole, len(ids(demos)) + 1)
        assert out.num_tokens[row] == len(whole) - 1
        np.testing.assert_allclose(out.logp_unconditioned[row], plain, atol=LOGP_ATOL, rtol=0)
        np.testing.assert_allclose(out.logp_conditioned[row], conditioned, atol=LOGP_ATOL, rtol=0)


def test_a_tokenizer_with_bos_scores_every_token(tokenizer):
    """With a BOS before text, the first text token is predicted from it and scored; nothing is dropped."""
    from testing_utils import tiny_tokenizer
    from tokenizers.processors import TemplateProcessing

    bos_tokenizer = tiny_tokenizer()
    bos = bos_tokenizer.convert_tokens_to_ids("<|im_start|>")
    bos_tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    renderer = Renderer(bos_tokenizer)
    assert renderer.bos
    row, demo = read_dataset([{"text": texts(1)[0]}, {"text": texts(1, offset=9)[0]}])
    plain, conditioned = renderer.unconditioned(row), renderer.conditioned(row, [demo])
    full = bos_tokenizer(row.response + bos_tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert plain.prefix == renderer.bos and plain.context == () and list(plain.response) == full
    assert conditioned.response == plain.response and conditioned.prefix[: len(renderer.bos)] == renderer.bos


def stock_and_ica(tokenizer, tmp_path, train, holdout, **kwargs):
    return stock_and_ica_sft(tokenizer, tmp_path, train, holdout, COMMON, UNIT_ONLINE, **kwargs)


@pytest.mark.parametrize("source", ["text", "formatting_func", "dataset_text_field"])
def test_language_modeling_data_trains_like_sfttrainer_with_unit_weights(tokenizer, tmp_path, source):
    """A `text` dataset, raw rows with a `formatting_func`, or text in another column: with unit weights the ICA
    run trains exactly like SFTTrainer, and online scoring reads log p(text) off the training forward."""
    kwargs, extra = {}, {}
    if source == "text":
        train, holdout = Dataset.from_dict({"text": texts()}), Dataset.from_dict({"text": texts(5, offset=20)})
    elif source == "formatting_func":

        def rows(n, k=0):
            return Dataset.from_list(
                [{"q": f"what is {i} plus {i + 1}?", "a": f"{2 * i + 1}."} for i in range(k, k + n)]
            )

        train, holdout = rows(12), rows(5, 20)
        kwargs["formatting_func"] = lambda row: f"Question: {row['q']} Answer: {row['a']}"
    else:
        train = Dataset.from_dict({"content": texts()})
        holdout = Dataset.from_dict({"content": texts(5, offset=20)})
        extra["dataset_text_field"] = "content"
    COMMON.update(extra)
    try:
        stock, ours = stock_and_ica(tokenizer, tmp_path, train, holdout, **kwargs)
    finally:
        for key in extra:
            COMMON.pop(key)
    assert_requests_are_the_training_sequences(ours)  # the training forward is log p(text)
    mine = dict(ours.model.named_parameters())
    for name, p in stock.model.named_parameters():
        assert torch.equal(p, mine[name]), name
    # the scores are those of the formatted text rows
    scored = Dataset.from_dict({"text": texts()})
    assert ours.ica.builder.candidates[0].response == read_dataset(scored)[0].response
