"""Helpers shared by the tests: tiny models and tokenizer, the rows the tests train on, trainers of one step, ways
to force weights, and the named tolerances the comparisons use."""

import numpy as np
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab_size: int = 128, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: ChatML that renders a row's `tools`, assistant tool calls and tool turns, and marks assistant turns with
#: `{% generation %}` (what TRL's `assistant_only_loss` reads).
TOOL_CHATML = (
    "{%- if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{%- if message['content'] %}{{ message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{%- endfor %}"
    "{{ '<|im_end|>\n' }}{% endgeneration %}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
_CORPUS = [
    "What is 12 plus 7? The answer is 19.",
    "Name a color of the sky. Blue.",
    "Question: Answer: Please answer the",
    "following question examples Prefer responses the questions follow",
    "How many legs does a spider have? Eight.",
    "Translate cat to French. Chat.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 #### = + - * /",
    "user assistant system",
]


def tiny_tokenizer(vocab_size: int = 400, chat_template: str = CHATML):
    """A small byte-level BPE tokenizer with ChatML special tokens, trained offline in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = chat_template
    return fast


def four_bit_tiny_llama(tokenizer, folder):
    """A tiny Llama saved to `folder` and loaded back with real bitsandbytes NF4 4-bit quantisation (CPU); the one
    place a test that needs bitsandbytes (the `qlora` extra) is skipped without it."""
    import pytest

    pytest.importorskip("bitsandbytes", reason="4-bit tests need bitsandbytes (the `qlora` extra)")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=64, intermediate_size=128
    ).save_pretrained(folder)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)


def force_weights(trainer, weights, monkeypatch):
    """Make every step of `trainer` weight its examples `weights` (in batch order), or `weights(indices, scores)`
    when it is a function, whatever their scores; the loss reduction applies to them as to computed weights."""
    from trl_ica.trainer.weigher import StepWeights

    def weigher(scores, indices, step, state, units=None):
        chosen = weights(indices, scores) if callable(weights) else weights
        units = np.ones(len(indices)) if units is None else np.asarray(units, dtype=np.float64)
        return StepWeights(np.asarray(indices), scores, units, np.asarray(chosen, dtype=np.float64), slice(None))

    monkeypatch.setattr(trainer.ica, "weigher", weigher)


def assert_weight_zero_drops_a_pair(trainer, monkeypatch):
    """The gradient of pairs 0-2 weighted (0, 1, 1) is 2/3 of that of pairs 1-2 weighted (1, 1): the losses are
    means over pairs, so a weight of 0 removes pair 0 from the gradient and nothing else changes."""

    model = trainer.model.train()
    grads = []
    for rows, weights in (([0, 1, 2], [0.0, 1.0, 1.0]), ([1, 2], [1.0, 1.0])):
        force_weights(trainer, weights, monkeypatch)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1] and any(g.abs().max() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name] * 2 / 3, atol=1e-6, rtol=1e-4)


def weighted_loss_and_grads(trainer, batch, weights, monkeypatch):
    """The trainer's training loss on `batch` with the ICA weights forced to `weights`, and its parameter
    gradients (gradients are zeroed afterwards)."""

    force_weights(trainer, weights, monkeypatch)
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads


#: The summed difference with batch min-max: the score `score_ica` computes by default, which the trainer tests
#: compare against (the trainers' own defaults come from `ica_preset`).
SUMMED_DIFFERENCE = dict(ica_score_form="difference", ica_reduction="sum", ica_weighting="batch_minmax")

# One optimizer step over STEP_ROWS rows, split in different ways (test_step_weights.py, test_distributed.py)
STEP_ROWS = 16
#: The CPU training arguments every test trainer starts from (no reports, no bf16, no checkpoints unless a test
#: asks, a log line per step, seed 0).
CPU_ARGS = dict(report_to="none", bf16=False, use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
STEP_COMMON = dict(
    CPU_ARGS,
    max_steps=1,
    optim="sgd",
    learning_rate=0.5,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    dataloader_drop_last=False,
    ica_demo_selection="fixed",
    **SUMMED_DIFFERENCE,
)


def step_sft_rows():
    answer = lambda i: f"The answer is {2 * i + 1}." * (1 + i % 3)  # noqa: E731
    train = [chat_row(f"What is {i} plus {i + 1}?", answer(i)) for i in range(STEP_ROWS)]
    holdout = [chat_row(f"What is {i} plus 7?", f"The answer is {i + 7}.") for i in range(5)]
    return Dataset.from_list(train), Dataset.from_list(holdout)


def step_pair_rows():
    return dpo_pairs(STEP_ROWS)


def step_trainer(kind, tokenizer, folder, batch, accumulation, extra_rows=0, model=None, ref_model=None, **fields):
    """An ICA trainer (`kind`: "sft", "dpo" or "simpo") of one SGD step over `STEP_ROWS` rows, split as `batch` rows
    per device x `accumulation` micro-batches, with a tiny Llama of seed 0 unless `model` is given."""
    from trl_ica import ICACPOTrainer, ICADPOConfig, ICADPOTrainer, ICASFTConfig, ICASFTTrainer, ICASimPOConfig

    model = model or tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.train()
    settings = dict(
        STEP_COMMON,
        output_dir=str(folder),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        **fields,
    )
    if kind == "sft":
        train, holdout = step_sft_rows()
        train = Dataset.from_list(list(train) + list(train)[:extra_rows])
        return ICASFTTrainer(
            model,
            args=ICASFTConfig(**settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    train, holdout = step_pair_rows()
    if kind == "dpo":
        ref = ref_model or tiny_llama(seed=0, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        return ICADPOTrainer(
            model,
            ref.eval(),
            args=ICADPOConfig(**settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    return ICACPOTrainer(
        model,
        args=ICASimPOConfig(**settings, max_length=256),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )


# --- shared data and model builders ----------------------------------------------------------------------------


def chat_row(q, a):
    """A conversational prompt/completion row."""
    return {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}


def conv_pair(q, good, bad):
    return {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }


def dpo_pairs(n=12):
    """Conversational pairs (n training, 5 holdout) whose chosen answer is the right sum."""
    train = Dataset.from_list(
        [
            conv_pair(f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}.", f"The answer is {i}." * (1 + i % 3))
            for i in range(n)
        ]
    )
    holdout = Dataset.from_list(
        [conv_pair(f"What is {i} plus 7?", f"The answer is {i + 7}.", f"It is {i}.") for i in range(5)]
    )
    return train, holdout


def pair_rows(fmt):
    """Seven pairs as `fmt` data: \"conversational\", \"standard\" or \"implicit\" (prompt inside the answers)."""
    rows = [
        (f"What is {i} plus {i + 1}?", f"The answer is {2 * i + 1}.", f"The answer is {i}." * (1 + i % 2))
        for i in range(7)
    ]
    if fmt == "conversational":
        return [conv_pair(*r) for r in rows]
    if fmt == "standard":
        return [{"prompt": q, "chosen": " " + a, "rejected": " " + b} for q, a, b in rows]
    return [{"chosen": q + " " + a, "rejected": q + " " + b} for q, a, b in rows]  # implicit prompt


def tiny_llama_for(tokenizer, seed=0):
    return tiny_llama(seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()


def score_files(folder, tokenizer, train, holdout=None, model=None, holdout_file="holdout.jsonl") -> list[str]:
    """Write what `trl-ica score` reads into `folder`: `model` (a tiny Llama for `tokenizer` if None) saved with
    `tokenizer` in `folder/model`, `train` (a `Dataset` or a list of rows) as `train.jsonl` and `holdout` as
    `holdout_file` (JSON lines, or Parquet by its suffix). Returns the command's arguments naming them: `--model`,
    `--dataset` and, with a holdout, `--holdout`."""
    model_dir = folder / "model"
    (model if model is not None else tiny_llama_for(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = ["--model", str(model_dir)]
    for flag, rows, name in (("--dataset", train, "train.jsonl"), ("--holdout", holdout, holdout_file)):
        if rows is None:
            continue
        rows = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
        path = folder / name
        rows.to_parquet(path) if name.endswith(".parquet") else rows.to_json(path)
        args += [flag, str(path)]
    return args


def tiny_lora():
    from peft import LoraConfig

    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def write_recipe_data(folder, preference):
    """Six training rows and a holdout of four, as train.jsonl / holdout.jsonl (SFT or preference pairs)."""
    rows = []
    for i in range(8):
        prompt = [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]
        good = [{"role": "assistant", "content": f"It is {2 * i + 1}."}]
        bad = [{"role": "assistant", "content": f"It is {i}."}]
        rows.append(
            {"prompt": prompt, "chosen": good, "rejected": bad}
            if preference
            else {"prompt": prompt, "completion": good}
        )
    Dataset.from_list(rows[:6]).to_json(folder / "train.jsonl")
    Dataset.from_list(rows[6:] * 2).to_json(folder / "holdout.jsonl")


# --- tolerances ---------------------------------------------------------------------------------------------------
# Two float32 computations of one number (fused against naive, another batch shape, padding, a shared prefix cache,
# other processes) agree up to rounding, whose size depends on the order of the reductions. These bounds are for the
# tiny test models (vocabulary <= 400, hidden size <= 64, sequences of at most a few hundred tokens); float64 and
# real-model comparisons derive their own where they are made.

#: A summed log-probability, or an ICA score made of two: each token's log-prob moves by a few float32 ulp of the
#: log-softmax (about 1e-6 at |log p| <= 10) when the reduction order changes, and a response has at most ~100 scored
#: tokens here.
LOGP_ATOL = 1e-4
#: One token's log-prob: a few float32 ulp of the log-softmax, about 1e-6 at |log p| <= 10.
TOKEN_LOGP_ATOL = 1e-5
#: A per-token mean of such a sum (the responses compared this way have about ten tokens or more).
MEAN_LOGP_ATOL = 1e-5
#: The same requests scored by the same forward in other groups (shards, processes in lockstep, a shuffled order):
#: only the padding and batch shape change, a few ulp per token of a short response.
REGROUPED_ATOL = 1e-5
#: A weight in [0, 1] computed from the same scores another way.
WEIGHT_ATOL = 1e-5
#: A loss (a mean of per-token NLLs, each <= ~10) computed from the same logits through another reduction.
LOSS_ATOL = 1e-5
#: A Data Whisperer query score (a mean token log-prob of a short answer, or a metric of it) and an example's mean
#: of them, computed in batches against the naive batch-1 loop: float32 reductions over other shapes move a
#: log-prob by a few 1e-6 relative; 1e-4 relative leaves a margin of about ten, and the absolute floor covers scores
#: near 0.
QUERY_SCORE_TOL = dict(rtol=1e-4, atol=1e-7)
#: The same, through a 4-bit model: bitsandbytes' matmuls round differently at other batch shapes, about 1e-4
#: relative per layer over a few layers, so 1e-3 relative (1e-3 nats of a mean log-prob near 1).
FOUR_BIT_QUERY_SCORE_TOL = dict(rtol=1e-3, atol=1e-7)
#: Gradients, and parameters after one SGD step, computed through other reductions or micro-batch splits: float32
#: accumulation over a few hundred tokens; relative for large entries, absolute for those near 0.
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)


def minmax_weight_atol(scores, score_atol: float) -> float:
    """The bound on a batch min-max weight `(s - min) / (max - min)` when each of `scores` may move by `score_atol`
    (computed through another forward): the numerator and the range each move by up to `2 * score_atol`, so to first
    order the weight moves by up to `4 * score_atol / (max - min)`."""
    return 4 * score_atol / (max(scores) - min(scores))


def training_sequences(trainer, row) -> list[tuple[list[int], list[int]]]:
    """A prepared training row of `trainer` as TRL trains it: `(token ids, positions whose token the loss
    predicts)` for an SFT row, or for the chosen and the rejected answer of a pair."""
    from trl_ica import ICACPOTrainer, ICADPOTrainer

    if isinstance(trainer, ICADPOTrainer):
        out = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = (row["prompt_ids"] + row[key])[: trainer.args.max_length]
            out.append((ids, list(range(len(row["prompt_ids"]), len(ids)))))
        return out
    if isinstance(trainer, ICACPOTrainer):
        return [
            (row[f"{key}_input_ids"], [i for i, label in enumerate(row[f"{key}_labels"]) if label != -100])
            for key in ("chosen", "rejected")
        ]
    # position 0 is never predicted (the loss reads shifted labels), whatever its label says
    return [(row["input_ids"], [i for i, label in enumerate(row["labels"]) if label != -100 and i > 0])]


def assert_requests_are_the_training_sequences(trainer):
    """Every training row's unconditioned scoring request is exactly its training sequence, and the scored response
    exactly the tokens the training loss predicts (all of the response, or its `scored` positions): ICA renders the
    rows again and must get TRL's tokens."""
    builder = trainer.ica.builder
    for row in trainer.train_dataset:
        requests = builder.requests(row["ica_index"], False)
        for (ids, positions), request in zip(training_sequences(trainer, row), requests, strict=True):
            assert list(ids) == list(request.prefix + request.context + request.response), row["ica_index"]
            start = len(ids) - len(request.response)
            assert list(positions) == [start + k for k in request.positions], row["ica_index"]


def stock_and_ica_sft(tokenizer, folder, train, holdout, settings, ica_fields=None, train_ours=True, **trainer_kwargs):
    """`SFTTrainer`, trained, and `ICASFTTrainer` on the same rows and `settings` (with `ica_fields` on top), each
    on a fresh tiny Llama for `tokenizer`; `trainer_kwargs` go to both constructors. Returns `(stock, ours)`, ours
    trained unless `train_ours` is False (to look at it before training)."""
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer

    torch.manual_seed(0)
    stock = SFTTrainer(
        tiny_llama_for(tokenizer),
        args=SFTConfig(output_dir=str(folder / "stock"), **settings),
        train_dataset=train,
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    stock.train()
    torch.manual_seed(0)
    ours = ICASFTTrainer(
        tiny_llama_for(tokenizer),
        args=ICASFTConfig(output_dir=str(folder / "ica"), **{**settings, **(ica_fields or {})}),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
        **trainer_kwargs,
    )
    if train_ours:
        ours.train()
    return stock, ours


def assert_trains_like(stock, ours):
    """`ours` logged the same training losses as `stock` and ended with bit-identical parameters."""
    assert [h["loss"] for h in stock.state.log_history if "loss" in h] == [
        h["loss"] for h in ours.state.log_history if "loss" in h
    ]
    mine = dict(ours.model.named_parameters())
    for name, p in stock.model.named_parameters():
        assert torch.equal(p, mine[name]), name
