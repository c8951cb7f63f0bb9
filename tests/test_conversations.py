"""Conversations as TRL trains on them: assistant turns that call tools, the tools' results, a row's `tools` schemas,
completions of several messages and `assistant_only_loss`. Each is scored on exactly the tokens the training loss
covers, against a naive reference that renders the conversation whole with the chat template and sums a full
forward's log-probs over those tokens."""

import json
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from testing_utils import (
    LOGP_ATOL,
    STEP_COMMON,
    TOOL_CHATML,
    assert_requests_are_the_training_sequences,
    assert_trains_like,
    tiny_llama,
    tiny_tokenizer,
    training_sequences,
)
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from trl_ica import ICACPOTrainer, ICADPOConfig, ICADPOTrainer, ICASFTConfig, ICASFTTrainer, ICASimPOConfig
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.ica import prepare_ica
from trl_ica.scoring.options import ICAScoringOptions

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}
TOOLS = json.dumps([ADD])  # a JSON string, as TRL's tool-calling datasets keep the column


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def tool_turn(i, j):
    """An assistant turn that calls `add`, the tool's result and the answer."""
    call = {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": j})}}
    return [
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "name": "add", "content": str(i + j)},
        assistant(f"The answer is {i + j}."),
    ]


def tool_completion(i, j):
    return {"prompt": [user(f"What is {i} plus {j}?")], "completion": tool_turn(i, j), "tools": TOOLS}


def tool_messages(i, j):
    return {"messages": [user(f"What is {i} plus {j}?"), *tool_turn(i, j)], "tools": TOOLS}


def several_messages(i, j):
    """A completion of an answer, the user's next question and the answer to it (no tools)."""
    completion = [assistant(f"It is {i + j}."), user("And twice that?"), assistant(f"It is {2 * (i + j)}.")]
    return {"prompt": [user(f"What is {i} plus {j}?")], "completion": completion}


def tool_pair(i, j):
    return {
        "prompt": [user(f"What is {i} plus {j}?")],
        "chosen": tool_turn(i, j),
        "rejected": [assistant(f"The answer is {i}.")],
        "tools": TOOLS,
    }


def stock(settings):
    """`settings` without the ICA fields, for TRL's own config."""
    return {k: v for k, v in settings.items() if not k.startswith("ica_")}


def rows(make, n, offset=0):
    return Dataset.from_list([make(i, i + 1 + offset) for i in range(offset, offset + n)])


def tiny_llama_for(tokenizer):
    """A tiny Llama with room for the tool schemas the byte-level test tokenizer spells out."""
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=4096)
    return model.train()


@pytest.fixture(scope="module")
def tool_tokenizer():
    return tiny_tokenizer(chat_template=TOOL_CHATML)


def naive_score(model, tokenizer, prompt, completion, tools, assistant_only):
    """The conversation rendered whole by the chat template (as TRL tokenises a prompt/completion row), and
    log p of the completion's tokens the loss covers (all, or the assistant-masked ones), from one full forward."""
    kwargs = dict(tools=tools, tokenize=True, return_dict=True)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs)["input_ids"]
    whole = tokenizer.apply_chat_template(prompt + completion, return_assistant_tokens_mask=True, **kwargs)
    ids, mask = list(whole["input_ids"]), whole["assistant_masks"]
    assert ids[: len(prompt_ids)] == list(prompt_ids)
    positions = [t for t in range(len(prompt_ids), len(ids)) if mask[t] or not assistant_only]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return ids, positions, float(sum(logp[t - 1, ids[t]] for t in positions))


@pytest.mark.parametrize("make", [tool_completion, several_messages], ids=["tool_calls", "several_messages"])
@pytest.mark.parametrize("assistant_only", [False, True], ids=["completion_loss", "assistant_only_loss"])
def test_scores_equal_the_naive_reference(tool_tokenizer, make, assistant_only):
    """Scored with and without demonstrations (holdout conversations of the same shape as earlier turns, their
    tools beside the row's), the tokens and the sums are the naive reference's."""
    model = tiny_llama_for(tool_tokenizer).eval()
    train, holdout = rows(make, 3), rows(make, 3, offset=20)
    options = ICAScoringOptions(num_demos=2, demo_selection="fixed", assistant_only=assistant_only)
    builder = prepare_ica(model, tool_tokenizer, train, holdout, options, show_progress=False)
    for i in range(len(train)):
        row = train[i]
        tools = json.loads(row["tools"]) if row.get("tools") else None
        demos = [holdout[int(j)] for j in builder.demo_indices[i]]
        for conditioned in (False, True):
            before = [m for d in demos for m in d["prompt"] + d["completion"]] if conditioned else []
            ids, positions, expected = naive_score(
                model, tool_tokenizer, before + row["prompt"], row["completion"], tools, assistant_only
            )
            (request,) = builder.requests(i, conditioned)
            assert list(request.prefix + request.context + request.response) == ids
            start = len(ids) - len(request.response)
            assert [start + k for k in request.positions] == positions
            got = score_requests(model, [request], show_progress=False)
            assert got.counts[0] == len(positions)
            np.testing.assert_allclose(got.sums[0], expected, atol=LOGP_ATOL, rtol=0)
    if assistant_only:  # the tool's result and the user's turn are read, not scored
        assert builder.requests(0, False)[0].num_scored < len(builder.requests(0, False)[0].response)


@pytest.mark.parametrize("make", [tool_completion, several_messages], ids=["tool_calls", "several_messages"])
@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_sft_scores_the_tokens_trl_trains_on_and_unit_weights_train_like_stock(
    tool_tokenizer, tmp_path, make, assistant_only_loss
):
    train, holdout = rows(make, 8), rows(make, 4, offset=20)
    settings = dict(STEP_COMMON, per_device_train_batch_size=4, max_steps=2, assistant_only_loss=assistant_only_loss)
    torch.manual_seed(0)
    trl = SFTTrainer(
        tiny_llama_for(tool_tokenizer),
        args=SFTConfig(str(tmp_path / "a"), **stock(settings)),
        train_dataset=train,
        processing_class=tool_tokenizer,
    )
    trl.train()
    torch.manual_seed(0)
    args = ICASFTConfig(str(tmp_path / "b"), **{**settings, "ica_weighting": "none"})
    ours = ICASFTTrainer(
        tiny_llama_for(tool_tokenizer),
        args=args,
        train_dataset=train,
        processing_class=tool_tokenizer,
        holdout_dataset=holdout,
    )
    assert_requests_are_the_training_sequences(ours)
    ours.train()
    assert_trains_like(trl, ours)


def test_sft_weights_tool_calling_rows_at_the_defaults(tool_tokenizer, tmp_path):
    """The default settings (kNN demonstrations, the recommended score) train on tool-calling rows and weight them."""
    settings = dict(STEP_COMMON, per_device_train_batch_size=4, max_steps=2)
    settings.pop("ica_demo_selection")
    args = ICASFTConfig(str(tmp_path), **settings)
    trainer = ICASFTTrainer(
        tiny_llama_for(tool_tokenizer),
        args=args,
        train_dataset=rows(tool_messages, 8),
        processing_class=tool_tokenizer,
        holdout_dataset=rows(tool_messages, 4, offset=20),
    )
    trainer.train()
    weights = [json.loads(line)["weight"] for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(weights) == 8 and len(set(weights)) > 1


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_a_messages_row_scores_its_last_turn_among_the_tokens_trl_trains_on(
    tool_tokenizer, tmp_path, assistant_only_loss
):
    """A `messages` row's response is its last turn (the tool call, the tool's result and the answer): the same
    token ids as TRL's, scored on the positions of that turn TRL's loss covers."""
    args = ICASFTConfig(str(tmp_path), **STEP_COMMON, assistant_only_loss=assistant_only_loss)
    trainer = ICASFTTrainer(
        tiny_llama_for(tool_tokenizer),
        args=args,
        train_dataset=rows(tool_messages, 4),
        processing_class=tool_tokenizer,
        holdout_dataset=rows(tool_messages, 4, offset=20),
    )
    for row in trainer.train_dataset:
        ((ids, trained),) = training_sequences(trainer, row)
        (request,) = trainer.ica.builder.requests(row["ica_index"], False)
        assert list(ids) == list(request.prefix + request.context + request.response)
        start = len(ids) - len(request.response)
        assert [start + k for k in request.positions] == [t for t in trained if t >= start]
        turn = tool_tokenizer.decode(request.response)
        assert turn.startswith("<tool_call>") and "<|im_start|>tool\n" in turn and turn.endswith("<|im_end|>\n")


def test_dpo_scores_tool_calling_pairs_on_the_tokens_trl_trains_on(tool_tokenizer, tmp_path):
    train, holdout = rows(tool_pair, 8), rows(tool_pair, 4, offset=20)
    settings = dict(STEP_COMMON, per_device_train_batch_size=4, max_steps=2)
    torch.manual_seed(0)
    trl = DPOTrainer(
        tiny_llama_for(tool_tokenizer),
        tiny_llama_for(tool_tokenizer).eval(),
        args=DPOConfig(str(tmp_path / "a"), **stock(settings)),
        train_dataset=train,
        processing_class=tool_tokenizer,
    )
    trl.train()
    torch.manual_seed(0)
    ours = ICADPOTrainer(
        tiny_llama_for(tool_tokenizer),
        tiny_llama_for(tool_tokenizer).eval(),
        args=ICADPOConfig(str(tmp_path / "b"), **{**settings, "ica_weighting": "none"}),
        train_dataset=train,
        processing_class=tool_tokenizer,
        holdout_dataset=holdout,
    )
    assert_requests_are_the_training_sequences(ours)
    chosen, rejected = ours.ica.builder.requests(0, True)
    assert "<tool_call>" in tool_tokenizer.decode(chosen.response)
    assert "<tool_call>" not in tool_tokenizer.decode(rejected.response)
    ours.train()
    assert_trains_like(trl, ours)


def test_simpo_refuses_a_tools_column_and_trains_on_several_message_answers(tool_tokenizer, tmp_path):
    settings = dict(STEP_COMMON, per_device_train_batch_size=4, max_steps=1, max_length=1024)
    train, holdout = rows(tool_pair, 4), rows(tool_pair, 4, offset=20)
    kwargs = train.add_column("chat_template_kwargs", [{"greeting": "Hi."}] * 4).remove_columns("tools")
    with pytest.raises(ValueError, match=r"has a `chat_template_kwargs` column, which TRL's CPOTrainer does not"):
        ICACPOTrainer(
            tiny_llama_for(tool_tokenizer),
            args=ICASimPOConfig(str(tmp_path), **settings),
            train_dataset=kwargs,
            processing_class=tool_tokenizer,
            holdout_dataset=holdout,
        )
    with pytest.raises(ValueError, match=r"`train_dataset` has a `tools` column, which TRL's CPOTrainer does not"):
        ICACPOTrainer(
            tiny_llama_for(tool_tokenizer),
            args=ICASimPOConfig(str(tmp_path), **settings),
            train_dataset=train,
            processing_class=tool_tokenizer,
            holdout_dataset=holdout,
        )
    trainer = ICACPOTrainer(
        tiny_llama_for(tool_tokenizer),
        args=ICASimPOConfig(str(tmp_path), **settings),
        train_dataset=train.remove_columns("tools"),
        processing_class=tool_tokenizer,
        holdout_dataset=holdout.remove_columns("tools"),
    )
    trainer.train()
    assert trainer.ica.state.scores is not None and np.isfinite(trainer.ica.state.scores).all()


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (dict(layout="in_turn"), r"set `ica_demo_layout='turns'`"),
        (dict(span="last_line"), r"`ica_score_span`='last_line' scores part of a text response"),
        (dict(score_end=False), r"`ica_score_end_token=False` cannot leave them out"),
    ],
)
def test_settings_that_cannot_score_a_structured_response_are_refused(tool_tokenizer, setting, match):
    options = ICAScoringOptions(num_demos=1, demo_selection="fixed", **setting)
    with pytest.raises(ValueError, match=match):
        prepare_ica(
            tiny_llama_for(tool_tokenizer),
            tool_tokenizer,
            rows(tool_completion, 2),
            rows(tool_completion, 2, offset=20),
            options,
            show_progress=False,
        )


def test_a_completion_without_an_assistant_turn_is_refused(tool_tokenizer):
    bad = [{"prompt": [user("Hi")], "completion": [user("Anyone?")]}]
    with pytest.raises(ValueError, match=r"row 0: the completion has no assistant message \(roles \['user'\]\)"):
        options = ICAScoringOptions(num_demos=1)
        prepare_ica(
            tiny_llama_for(tool_tokenizer),
            tool_tokenizer,
            Dataset.from_list(bad),
            rows(several_messages, 2, offset=20),
            options,
            show_progress=False,
        )


# --- every dataset kind TRL documents, against every ICA trainer ------------------------------------------------


def _kind_rows(kind, i, j):
    q, good, bad = f"What is {i} plus {j}?", f"The answer is {i + j}.", f"The answer is {i}."
    return {
        "language modeling, standard": {"text": f"{q} {good}"},
        "language modeling, conversational": {"messages": [user(q), assistant(good)]},
        "prompt-only, standard": {"prompt": q},
        "prompt-only, conversational": {"prompt": [user(q)]},
        "prompt-completion, standard": {"prompt": q, "completion": " " + good},
        "prompt-completion, conversational": {"prompt": [user(q)], "completion": [assistant(good)]},
        "preference, standard": {"prompt": q, "chosen": " " + good, "rejected": " " + bad},
        "preference, conversational": {"prompt": [user(q)], "chosen": [assistant(good)], "rejected": [assistant(bad)]},
        "preference with an implicit prompt, standard": {"chosen": f"{q} {good}", "rejected": f"{q} {bad}"},
        "preference with an implicit prompt, conversational": {
            "chosen": [user(q), assistant(good)],
            "rejected": [user(q), assistant(bad)],
        },
        "tool calling, conversational language modeling": tool_messages(i, j),
        "tool calling, conversational prompt-completion": tool_completion(i, j),
        "tool calling, conversational preference": tool_pair(i, j),
    }[kind]


#: What each ICA trainer does with each dataset kind of TRL's documentation (https://huggingface.co/docs/trl/
#: dataset_formats): None, it trains (weighted); else the start of its refusal, which names the reason.
#: docs/training.md's table of dataset kinds is checked against this one.
KIND_OUTCOMES = {
    "language modeling, standard": (None, "has single responses", "has single responses"),
    "language modeling, conversational": (None, "has single responses", "has single responses"),
    "prompt-only, standard": ("a prompt-only row", "a prompt-only row", "a prompt-only row"),
    "prompt-only, conversational": ("a prompt-only row", "a prompt-only row", "a prompt-only row"),
    "prompt-completion, standard": (None, "has single responses", "has single responses"),
    "prompt-completion, conversational": (None, "has single responses", "has single responses"),
    "preference, standard": ("has pairs", None, None),
    "preference, conversational": ("has pairs", None, None),
    "preference with an implicit prompt, standard": ("has pairs", None, None),
    "preference with an implicit prompt, conversational": ("has pairs", None, None),
    "tool calling, conversational language modeling": (None, "has single responses", "has a `tools` column"),
    "tool calling, conversational prompt-completion": (None, "has single responses", "has a `tools` column"),
    "tool calling, conversational preference": ("has pairs", None, "has a `tools` column"),
}
TRAINERS = ("ICASFTTrainer", "ICADPOTrainer", "ICACPOTrainer")


def _kind_trainer(name, kind, tokenizer, folder):
    train = Dataset.from_list([_kind_rows(kind, i, i + 1) for i in range(4)])
    holdout = Dataset.from_list([_kind_rows(kind, i, 7) for i in range(3)])
    settings = dict(STEP_COMMON, per_device_train_batch_size=2, max_steps=1, ica_num_demos=1)
    model = tiny_llama_for(tokenizer)
    if name == "ICASFTTrainer":
        return ICASFTTrainer(
            model,
            args=ICASFTConfig(str(folder), **settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    if name == "ICADPOTrainer":
        return ICADPOTrainer(
            model,
            tiny_llama_for(tokenizer).eval(),
            args=ICADPOConfig(str(folder), **settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    return ICACPOTrainer(
        model,
        args=ICASimPOConfig(str(folder), max_length=1024, **settings),
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=holdout,
    )


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("kind", list(KIND_OUTCOMES))
def test_each_dataset_kind_trains_weighted_or_is_refused_with_the_reason(tool_tokenizer, tmp_path, kind, trainer):
    refusal = KIND_OUTCOMES[kind][TRAINERS.index(trainer)]
    if refusal is not None:
        with pytest.raises(ValueError, match=f"(?s){re.escape(refusal)}"):
            _kind_trainer(trainer, kind, tool_tokenizer, tmp_path)
        return
    run = _kind_trainer(trainer, kind, tool_tokenizer, tmp_path)
    run.train()
    records = [json.loads(line) for line in open(tmp_path / "ica" / "weights.jsonl")]
    assert len(records) == 2 and all(np.isfinite(r["score"]) for r in records)
    assert len({r["score"] for r in records}) == 2  # two rows, two scores: each row was scored on its own tokens


def test_the_docs_table_of_dataset_kinds_is_the_tested_one():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    table = text.split("<!-- dataset kinds -->")[1].strip().split("\n\n")[0]  # the table under the marker
    rows = [line.strip("|").split("|") for line in table.splitlines() if "---" not in line]
    documented = {cells[0].strip(): tuple(c.strip() for c in cells[1:]) for cells in rows[1:]}
    assert [h.strip() for h in rows[0][1:]] == [f"`{t}`" for t in TRAINERS]
    expected = {
        kind: tuple("trains" if r is None else "refused" for r in outcome) for kind, outcome in KIND_OUTCOMES.items()
    }
    assert {k: tuple(c.split(":")[0].split(" (")[0] for c in v) for k, v in documented.items()} == expected


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_a_rows_chat_template_kwargs_reach_the_template_as_in_training(kind, tmp_path):
    """`chat_template_kwargs` (e.g. `enable_thinking`) are the chat template's variables for that row, which TRL
    passes when it tokenises: ICA renders the row with them, so its requests are TRL's training sequences."""
    template = "{%- if greeting %}{{ '<|im_start|>system\\n' + greeting + '<|im_end|>\\n' }}{%- endif %}" + TOOL_CHATML
    tokenizer = tiny_tokenizer(chat_template=template)

    def row(i, j):
        base = _kind_rows("preference, conversational" if kind == "dpo" else "prompt-completion, conversational", i, j)
        return {**base, "chat_template_kwargs": {"greeting": f"Be brief {i}."}}

    train = Dataset.from_list([row(i, i + 1) for i in range(4)])
    holdout = Dataset.from_list([row(i, 7) for i in range(3)])
    settings = dict(STEP_COMMON, per_device_train_batch_size=2, max_steps=1, ica_num_demos=1)
    if kind == "sft":
        trainer = ICASFTTrainer(
            tiny_llama_for(tokenizer),
            args=ICASFTConfig(str(tmp_path), **settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    else:
        trainer = ICADPOTrainer(
            tiny_llama_for(tokenizer),
            tiny_llama_for(tokenizer).eval(),
            args=ICADPOConfig(str(tmp_path), **settings),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
        )
    assert_requests_are_the_training_sequences(trainer)
    request = trainer.ica.builder.requests(2, True)[0]
    assert "Be brief 2." in tokenizer.decode(request.prefix + request.context)
    trainer.train()
