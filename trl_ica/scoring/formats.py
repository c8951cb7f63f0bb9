"""Reading TRL dataset rows as (prompt, response) pairs.

ICA scores a response given its prompt. The formats are TRL's own (https://huggingface.co/docs/trl/dataset_formats):
prompt/completion, standard or conversational, and `messages` conversations, whose last turn (every message after the
last user message) is the response; a response of several messages, tool calls or a row's `tools` is kept as messages
([`SFTExample.completion`]) for the chat template to render. ShareGPT-style `conversations` rows are converted the way
TRL converts them. A language-modeling row (`text`) is a response with an empty prompt: its score is
log p(text | demonstrations) - log p(text), as TRL trains on every token of it. A pre-tokenised row (`input_ids`,
with the positions that carry loss from `labels`, a `loss_mask` or `completion_mask`, or every position) is scored on
its own token ids ([`TokenExample`]).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trl.data_utils import is_conversational_from_value, maybe_convert_to_chatml

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class SFTExample:
    """One row as a prompt and the response to score.

    Args:
        prompt (`str` or `list[dict]`):
            The prompt text (standard format) or the messages before the scored assistant turn (conversational).
        response (`str`):
            The text of the scored response.
        question (`str`):
            The text that stands for the prompt in demonstrations, templates and embeddings: the prompt itself, or the
            content of the first user message; for a language-modeling row, the text.
        language_modeling (`bool`):
            a `text` row: the prompt is empty and the whole text is scored.
        completion (`tuple[dict]`, *optional*):
            the messages of the response when it is not one assistant message of text: several messages (an
            assistant turn, a tool's result, another assistant turn), or tool calls, or a row with `tools`. The chat
            template renders them after the prompt exactly as training does; `response` is then their text, for
            embeddings and duplicate checks.
        tools (`tuple[dict]`, *optional*): the row's `tools` column (TRL's tool-calling format), which the chat
            template renders with the row.
        template_kwargs (`dict`, *optional*): the row's `chat_template_kwargs` column (e.g. `enable_thinking`),
            given to the chat template as TRL gives it.
    """

    prompt: str | Messages
    response: str
    question: str
    language_modeling: bool = False
    completion: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] | None = None
    template_kwargs: dict | None = None

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    @property
    def structured(self) -> bool:
        """The response is rendered from messages by the chat template: several messages, tool calls or `tools`."""
        return self.completion is not None


@dataclass(frozen=True)
class TokenExample(SFTExample):
    """A pre-tokenised row: its token ids and the run `[start, end)` of positions that carry loss, scored given
    `ids[:start]`. `question` and `response` are the decoded prompt and response (for kNN and duplicate checks), filled
    in by [`read_dataset`] when it is given the tokenizer."""

    ids: tuple[int, ...] = ()
    start: int = 1
    end: int = 0


#: Columns that give the positions of a pre-tokenised row that carry loss, in the order they are looked for.
TOKEN_MASKS = ("labels", "loss_mask", "completion_mask")


def _read_tokens(row: Mapping[str, Any], where: str) -> TokenExample:
    ids = row["input_ids"]
    if not isinstance(ids, Sequence) or not ids or not all(isinstance(t, int) for t in ids):
        raise ValueError(f"{where}: `input_ids` must be a non-empty list of token ids.")
    column = next((c for c in TOKEN_MASKS if c in row), None)
    values = row[column] if column else [1] * len(ids)
    if len(values) != len(ids):
        raise ValueError(f"{where}: `{column}` has {len(values)} entries for {len(ids)} `input_ids`.")
    carries = [(v != -100) if column == "labels" else bool(v) for v in values]
    positions = [t for t in range(1, len(ids)) if carries[t]]  # position 0 is never predicted
    if not positions:
        raise ValueError(
            f"{where}: no position after the first carries loss (`{column or 'input_ids'}`): nothing to score."
        )
    start, end = positions[0], positions[-1] + 1
    if end - start != len(positions):
        raise ValueError(
            f"{where}: the positions that carry loss (`{column}`) are not one run ({len(positions)} positions between "
            f"{start} and {end - 1}). ICA scores one response per row given what precedes it: give each row one "
            "response (e.g. only the last assistant turn in its mask), or use a `messages` or prompt/completion "
            "dataset."
        )
    return TokenExample("", "", "", ids=tuple(ids), start=start, end=end)


@dataclass(frozen=True)
class PreferenceExample:
    """One preference row: a prompt with a chosen and a rejected response (same fields as [`SFTExample`]; the
    `*_messages` are the responses' messages when they are structured, as [`SFTExample.completion`])."""

    prompt: str | Messages
    chosen: str
    rejected: str
    question: str
    chosen_messages: tuple[dict, ...] | None = None
    rejected_messages: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] | None = None
    template_kwargs: dict | None = None

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    def as_sft(self, which: str = "chosen") -> SFTExample:
        messages = getattr(self, f"{which}_messages")
        return SFTExample(
            self.prompt,
            getattr(self, which),
            self.question,
            completion=messages,
            tools=self.tools,
            template_kwargs=self.template_kwargs,
        )


def _is_message(m: Any) -> bool:
    # an assistant turn that calls tools may have no `content` (or None in a `datasets` column)
    return isinstance(m, Mapping) and "role" in m and ("content" in m or bool(m.get("tool_calls")))


def _is_messages(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(_is_message(m) for m in value)


def _plain_reply(messages: Messages) -> bool:
    """One assistant message of text and nothing else: the response the placeholder rendering handles."""
    return (
        len(messages) == 1
        and messages[0]["role"] == "assistant"
        and isinstance(messages[0].get("content"), str)
        and not messages[0].get("tool_calls")
    )


def _message_text(message: Mapping[str, Any], where: str) -> str:
    """A message's text, its tool calls written as JSON after it: what embeddings and duplicate checks read."""
    content = message.get("content")
    text = "" if content is None else _content_text(content, where)
    calls = message.get("tool_calls") or []
    return "\n".join([text] * bool(text) + [json.dumps(c, sort_keys=True, default=str) for c in calls])


def _structured_response(messages: Messages, where: str) -> tuple[tuple[dict, ...], str]:
    """The messages of a structured response, and their text: they need at least one assistant turn, the one
    kind of message whose tokens ICA (and TRL's `assistant_only_loss`) trains on."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"{where}: the completion has no assistant message (roles {[m['role'] for m in messages]}); there is "
            "nothing the model says to score."
        )
    texts = [_message_text(m, where) for m in messages]
    return tuple(dict(m) for m in messages), "\n".join(t for t in texts if t)


def _read_tools(row: Mapping[str, Any], where: str) -> tuple[dict, ...] | None:
    """The row's `tools` (a list of JSON schemas, or that list as a JSON string, as TRL reads it), or None."""
    tools = row.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: `tools` is a string but not JSON ({error}).") from None
    if not isinstance(tools, Sequence) or not all(isinstance(t, Mapping) for t in tools):
        raise ValueError(f"{where}: `tools` must be a list of tool schemas (dicts), got {type(tools).__name__}.")
    return tuple(dict(t) for t in tools) or None


def _read_template_kwargs(row: Mapping[str, Any], where: str) -> dict | None:
    """The row's `chat_template_kwargs` (a dict of the chat template's extra variables, as TRL reads it), or None."""
    kwargs = row.get("chat_template_kwargs")
    if kwargs is None:
        return None
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: `chat_template_kwargs` must be a dict, got {type(kwargs).__name__}.")
    return dict(kwargs) or None


def _first_user_content(messages: Messages, where: str) -> str:
    for message in messages:
        if message["role"] == "user":
            return _check_prompt(_content_text(message["content"], where), where)
    raise ValueError(f"{where}: the prompt has no user message; ICA needs a question to condition on.")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    raise ValueError(
        f"{where}: message content of type {type(content).__name__} is not supported; ICA scores text messages "
        "(multimodal content parts are not supported)."
    )


def _check_response(response: str, where: str) -> str:
    if not isinstance(response, str) or not response.strip():
        raise ValueError(
            f"{where}: the response is empty ({response!r}). Every example needs a non-empty response to score; "
            "remove such rows from the dataset first."
        )
    return response


def _check_prompt(prompt: str, where: str) -> str:
    if not prompt.strip():
        raise ValueError(
            f"{where}: the prompt is empty ({prompt!r}). ICA scores a response given its prompt; remove such rows or "
            "give them a prompt."
        )
    return prompt


def _split_conversation(messages: Messages, where: str) -> tuple[Messages, Messages]:
    """`(prompt, response)`: the response is the last turn of the conversation, every message after its last user
    message (one assistant reply, or the tool calls, tool results and answer of an agent's turn)."""
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        raise ValueError(
            f"{where}: the conversation ends with {last!r}, not with an assistant turn, so it has no response to "
            "score. ICA scores the final turn of a `messages` row."
        )
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: the conversation has no user message; ICA needs a question to condition on.")
    return [dict(m) for m in messages[: users[-1] + 1]], list(messages[users[-1] + 1 :])


def _conversational_example(prompt: Messages, completion: Messages, row: Mapping[str, Any], where: str) -> SFTExample:
    """A conversational row's example: a plain reply, or (several messages, tool calls, or a row with `tools` or
    `chat_template_kwargs`) a structured one, which the chat template renders whole."""
    question = _first_user_content(prompt, where)
    tools, kwargs = _read_tools(row, where), _read_template_kwargs(row, where)
    if tools is None and kwargs is None and _plain_reply(completion):
        response = _content_text(completion[0]["content"], where)
        return SFTExample(prompt, _check_response(response, where), question)
    messages, text = _structured_response(completion, where)
    return SFTExample(
        prompt, _check_response(text, where), question, completion=messages, tools=tools, template_kwargs=kwargs
    )


def read_row(
    row: Mapping[str, Any], index: int | None = None, name: str = "dataset"
) -> SFTExample | PreferenceExample:
    """Read one dataset row as an [`SFTExample`] or a [`PreferenceExample`].

    Raises:
        `ValueError`: naming the row and the columns when the row cannot be split into prompt and response.
    """
    where = f"{name} row {index}" if index is not None else name
    row = {k: v for k, v in row.items() if v is not None}  # a file mixing formats fills the missing columns with None
    if is_conversational_from_value(row):
        row = maybe_convert_to_chatml(dict(row))
        # TRL renames the keys; ShareGPT's speaker names become chat roles here
        roles = {"human": "user", "gpt": "assistant"}
        row["messages"] = [{**m, "role": roles.get(m["role"], m["role"])} for m in row["messages"]]
    keys = set(row.keys())

    if {"chosen", "rejected"} <= keys:
        return _read_preference(row, where)
    if "input_ids" in keys:
        return _read_tokens(row, where)

    if "prompt" in keys and "completion" in keys:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return SFTExample(_check_prompt(prompt, where), _check_response(completion, where), prompt)
        if _is_messages(prompt) and _is_messages(completion):
            return _conversational_example([dict(m) for m in prompt], list(completion), row, where)
        raise ValueError(
            f"{where}: `prompt` and `completion` must both be strings or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )

    if "messages" in keys:
        if not _is_messages(row["messages"]):
            raise ValueError(
                f"{where}: `messages` must be a list of {{'role', 'content'}} dicts (an assistant turn may carry "
                "`tool_calls` instead of `content`)."
            )
        prompt, completion = _split_conversation(row["messages"], where)
        return _conversational_example(prompt, completion, row, where)

    if "text" in keys:
        text = row["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: `text` must be a string, got {type(text).__name__}.")
        return SFTExample("", _check_response(text, where), text, language_modeling=True)
    if "prompt" in keys:
        raise ValueError(
            f"{where}: a prompt-only row (`prompt` without `completion`, `chosen` or `rejected`) has no response, so "
            "nothing to score or to weight. ICA trainers take rows with responses: `prompt` + `completion`, "
            "`messages`, `text`, or (preference) `prompt` + `chosen` + `rejected`."
        )
    raise ValueError(
        f"{where}: unsupported columns {sorted(keys)}. Expected `prompt` + `completion`, `messages`, `text`, or "
        "(preference) `prompt` + `chosen` + `rejected`."
    )


def _read_preference(row: Mapping[str, Any], where: str) -> PreferenceExample:
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
    else:
        # Implicit prompt: the shared leading part of chosen and rejected, extracted as TRL does.
        from trl.data_utils import extract_prompt

        extracted = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = extracted["prompt"], extracted["chosen"], extracted["rejected"]
        if not prompt:
            raise ValueError(
                f"{where}: no `prompt` column, and `chosen` and `rejected` share no leading part to take as the "
                "prompt (TRL's implicit-prompt format). Give the row an explicit `prompt`."
            )
    if isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError(f"{where}: with a string `prompt`, `chosen` and `rejected` must be strings.")
        return PreferenceExample(
            prompt,
            _check_response(chosen, where + " (chosen)"),
            _check_response(rejected, where + " (rejected)"),
            prompt,
        )
    if not (_is_messages(prompt) and _is_messages(chosen) and _is_messages(rejected)):
        raise ValueError(f"{where}: `prompt`, `chosen` and `rejected` must all be strings or all lists of messages.")
    prompt = [dict(m) for m in prompt]
    sides = [
        _conversational_example(prompt, list(c), row, f"{where} ({label})")
        for label, c in (("chosen", chosen), ("rejected", rejected))
    ]
    return PreferenceExample(
        prompt,
        sides[0].response,
        sides[1].response,
        sides[0].question,
        chosen_messages=sides[0].completion,
        rejected_messages=sides[1].completion,
        tools=sides[0].tools,
        template_kwargs=sides[0].template_kwargs,
    )


def _row_format(row: Mapping[str, Any]) -> str:
    keys = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= keys:
        return "preference (chosen/rejected)"
    if {"prompt", "completion"} <= keys:
        return "prompt/completion"
    if "text" in keys and not {"messages", "conversations"} & keys:
        return "text"
    if "input_ids" in keys:
        return "pre-tokenised (input_ids)"
    return "messages" if "messages" in keys or "conversations" in keys else "other"


def _check_container(dataset, name: str) -> None:
    from datasets import Dataset, DatasetDict

    if dataset is None:
        raise ValueError(f"`{name}` is None; pass a dataset.")
    if isinstance(dataset, (DatasetDict, dict)):
        raise ValueError(
            f"`{name}` is a {type(dataset).__name__} of splits {sorted(dataset)}; pass one split, e.g. "
            f"`{name}['train']`."
        )
    if isinstance(dataset, str):
        raise ValueError(f"`{name}` is a string ({dataset!r}); load it first, e.g. `datasets.load_dataset(...)`.")
    if type(dataset).__name__ == "DataFrame":
        raise ValueError(f"`{name}` is a pandas DataFrame; convert it with `datasets.Dataset.from_pandas(...)`.")
    if not isinstance(dataset, (Dataset, list, tuple)):
        raise ValueError(f"`{name}` must be a `datasets.Dataset` or a list of dicts, got {type(dataset).__name__}.")


def read_dataset(dataset, name: str = "dataset", tokenizer=None) -> list[SFTExample | PreferenceExample]:
    """Read every row of `dataset` (a `datasets.Dataset` or a list of dicts); nothing is skipped. With `tokenizer`,
    pre-tokenised rows get their decoded prompt and response as `question` and `response`."""
    _check_container(dataset, name)
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty; it needs at least one row.")
    formats: dict[str, int] = {}
    for i, row in enumerate(dataset):
        if not isinstance(row, Mapping):
            raise ValueError(f"{name} row {i} is a {type(row).__name__}, not a dict of columns.")
        formats.setdefault(_row_format(row), i)
    if len(formats) > 1:
        listed = ", ".join(f"{kind} (first at row {i})" for kind, i in formats.items())
        raise ValueError(f"`{name}` mixes row formats: {listed}; every row must have the same format.")
    examples = [read_row(row, i, name) for i, row in enumerate(dataset)]
    if tokenizer is not None and isinstance(examples[0], TokenExample):
        import dataclasses

        decode = getattr(tokenizer, "tokenizer", tokenizer).decode
        examples = [
            dataclasses.replace(e, question=decode(e.ids[: e.start]), response=decode(e.ids[e.start : e.end]))
            for e in examples
        ]
    if len({e.conversational for e in examples}) > 1:
        first = next(i for i, e in enumerate(examples) if e.conversational != examples[0].conversational)
        raise ValueError(
            f"`{name}` mixes standard (text) and conversational (messages) rows, first at rows 0 and {first}; every "
            "row must have the same format."
        )
    return examples
