"""Turning examples and their demonstrations into scoring requests.

A scored sequence is `prefix + context + response`. The prefix (the chat template's opening and the demonstration
block) is what candidates share; the context is the candidate's own prompt; only the response tokens are scored.
Each piece is tokenised on its own, so a response has the same token ids with and without demonstrations.

Rendering mirrors how TRL trains: conversational rows go through the tokenizer's chat template, standard rows are
plain text with the EOS token appended to the response. Two choices shape the conditioned request of a
conversational row (`DEMO_LAYOUTS`): `"turns"` (the default) gives each demonstration as an earlier user/assistant
exchange before the row's own, unchanged turn, so the two requests differ only by the demonstrations; `"in_turn"`
writes the demonstrations and the question into one user turn with the ICA paper's wording (or a given template).
`score_end` decides whether the token that closes a response (the chat template's end of turn, or EOS) is scored
with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .formats import SFTExample, TokenExample
from .planner import LogProbRequest

#: How the demonstrations of a conversational row are laid out; see the module docstring.
DEMO_LAYOUTS = ("in_turn", "turns")
#: The layout every entry point (trainers, `score_ica`, the command line) uses unless told otherwise.
DEFAULT_DEMO_LAYOUT = "turns"
#: `span` values with a meaning of their own; any other string is a regular expression.
LAST_LINE = "last_line"
#: The whole response (what None means once a span is resolved).
WHOLE = "response"
#: The recommended span: the last line where every row allows a span, the whole response otherwise ([`auto_span`]).
AUTO = "auto"
SPAN_WORDS = (AUTO, WHOLE, LAST_LINE)


def check_span(span) -> None:
    """`span` is None, one of [`SPAN_WORDS`] or a regular expression that compiles."""
    if span is None or span in SPAN_WORDS:
        return
    if not isinstance(span, str) or not span:
        raise ValueError(
            f"`ica_score_span` must be None, one of {list(SPAN_WORDS)} or a regular expression, got {span!r}."
        )
    try:
        re.compile(span)
    except re.error as error:
        raise ValueError(f"`ica_score_span`={span!r} is not a valid regular expression: {error}.") from None


def span_chars(response: str, span: str) -> tuple[int, int] | None:
    """The characters `[start, end)` of `response` that `span` scores: its last line (trailing newlines aside), or
    the last match of the regular expression; None when the response has no such span (the pattern does not occur,
    or the response is blank)."""
    if span == LAST_LINE:
        body = response.rstrip("\n")
        return (body.rfind("\n") + 1, len(body)) if body.strip() else None
    matches = [m for m in re.finditer(span, response) if m.end() > m.start()]
    return (matches[-1].start(), matches[-1].end()) if matches else None


def auto_span(tokenizer, examples, holdout) -> tuple[str | None, str | None]:
    """What `span="auto"` scores on these read rows: `(LAST_LINE, None)` when every row of `examples` and `holdout`
    allows a span, else `(None, reason)`, the whole response and why. A span needs a prompt before a text response
    (not a language-modeling or pre-tokenised row, not a response of several messages or tool calls) and a fast
    tokenizer (character offsets); every response read has a line that is not blank. A span is all or nothing:
    scores over last lines and over whole responses do not compare, so one row that cannot have one gives every row
    the whole response. Preference pairs are always scored by their whole margin: `(None, None)`."""
    from .formats import PreferenceExample

    if any(isinstance(e, PreferenceExample) for e in examples[:1]):
        return None, None
    why = None
    for name, rows in (("train_dataset", examples), ("holdout_dataset", holdout)):
        for i, example in enumerate(rows):
            if example.language_modeling or isinstance(example, TokenExample):
                why = f"{name} row {i} is a language-modeling or pre-tokenised row, which has no prompt to follow"
            elif example.structured:
                why = f"{name} row {i} has a response of several messages or tool calls, or `tools`"
            if why is not None:
                break
        if why is not None:
            break
    if why is None and not getattr(getattr(tokenizer, "tokenizer", tokenizer), "is_fast", False):
        why = "the tokenizer is not a fast one, which a span needs for its character offsets"
    return (LAST_LINE, None) if why is None else (None, auto_fallback(why))


def auto_fallback(why: str) -> str:
    """The warning of `span="auto"` scoring whole responses, `why` being what rules the span out."""
    return (
        f"`ica_score_span={AUTO!r}` scores the last line of each response where every row allows a span, but {why}: "
        f"every row is scored over its whole response. Set `ica_score_span={WHOLE!r}` to say so and silence this."
    )


_USER = "\x00ICA_USER\x00"
_ASSISTANT = "\x00ICA_ASSISTANT\x00"


@dataclass(frozen=True)
class ICAPromptTemplate:
    """How demonstrations and the candidate's question are written in the conditioned prompt.

    Args:
        demo (`str`):
            One demonstration; `{prompt}` and `{response}` are replaced by a holdout example's question and response.
            Demonstrations are concatenated, most similar first.
        query (`str`):
            The candidate's question after the demonstrations; `{prompt}` is replaced by the question.

    The unconditioned prompt is always the candidate's prompt exactly as TRL renders it for training.

    Example:

    ```python
    >>> template = ICAPromptTemplate(demo="Q: {prompt}\\nA: {response}\\n\\n", query="Q: {prompt}\\nA:")
    ```
    """

    demo: str
    query: str

    def __post_init__(self):
        for field, value, needed in (
            ("demo", self.demo, ("{prompt}", "{response}")),
            ("query", self.query, ("{prompt}",)),
        ):
            missing = [p for p in needed if p not in value]
            if missing:
                raise ValueError(f"ICAPromptTemplate.{field}={value!r} must contain {' and '.join(needed)}.")

    def render_demos(self, demos: list[SFTExample]) -> str:
        # a language-modeling demonstration is its text alone: its prompt is empty
        return "".join(
            self.demo.replace("{prompt}", "" if d.language_modeling else d.question).replace("{response}", d.response)
            for d in demos
        )

    def render_query(self, question: str) -> str:
        return self.query.replace("{prompt}", question)


#: The wording of the ICA authors' code (arXiv 2510.14459), used in the user turn of the chat template.
PAPER_TEMPLATE = ICAPromptTemplate(
    demo="Prefer responses the questions follow examples:\nQuestion: {prompt}\nAnswer: {response}\n",
    query="\nPlease answer the following question:\n{prompt}\nAnswer:",
)
#: Plain few-shot concatenation in the data's own format, for standard (non-chat) datasets.
PLAIN_TEMPLATE = ICAPromptTemplate(demo="{prompt}{response}\n\n", query="{prompt}")


@dataclass(frozen=True)
class Pieces:
    head: str  # before the first user message's content
    mid: str  # after it, up to the response
    tail: str  # after the response


class Renderer:
    """Builds the conditioned and unconditioned [`LogProbRequest`]s of examples for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template ([`ICAPromptTemplate`], *optional*):
            Defaults to [`PAPER_TEMPLATE`] for conversational data and [`PLAIN_TEMPLATE`] for standard data. With
            `layout="turns"` conversational rows are refused with a template: their demonstrations are chat turns.
        chat_template (`str`, *optional*): a Jinja chat template that overrides the tokenizer's (as in `SFTConfig`).
        layout (`str`, *optional*, defaults to `"turns"`):
            `"turns"` or `"in_turn"`: where a conversational row's demonstrations go (see the module docstring).
        score_end (`bool`, *optional*, defaults to `True`):
            score the token that closes each response (end of turn or EOS), as TRL trains it.
        span (`str`, *optional*): score only part of each response, with the rest of it as context: `"last_line"`
            or a regular expression whose last match is the span ([`span_chars`]). The tokens are those of the whole
            response as training tokenises it, split at the first token that reaches the span; the closing token is
            scored with a span that ends the response. A response without the span is scored -inf (it lacks what the
            holdout's responses have; see [`ICARequestBuilder.spanless`]). Rows with a prompt only.
        assistant_only (`bool`, *optional*, defaults to `False`):
            `SFTConfig.assistant_only_loss`: of a structured response ([`SFTExample.completion`]: several messages,
            tool calls), score only the assistant tokens, as the chat template's `{% generation %}` marks them for
            TRL; otherwise every token of it, as TRL's completion loss covers them.
    """

    def __init__(
        self,
        tokenizer,
        template: ICAPromptTemplate | None = None,
        chat_template: str | None = None,
        layout: str = DEFAULT_DEMO_LAYOUT,
        score_end: bool = True,
        span: str | None = None,
        assistant_only: bool = False,
    ):
        check_span(span)
        if layout not in DEMO_LAYOUTS:
            raise ValueError(f"`layout` must be one of {list(DEMO_LAYOUTS)}, got {layout!r}.")
        if not isinstance(score_end, bool):
            raise ValueError(f"`score_end` must be True or False, got {score_end!r}.")
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors carry their tokenizer
        self.template = template
        self.chat_template = chat_template
        self.layout = layout
        self.score_end = score_end
        if span == AUTO:
            raise ValueError(
                f"`span={AUTO!r}` depends on the rows: resolve it with `auto_span` (the scoring functions do) before "
                "rendering."
            )
        self.span = None if span == WHOLE else span
        if not isinstance(assistant_only, bool):
            raise ValueError(f"`assistant_only_loss` must be True or False, got {assistant_only!r}.")
        self.assistant_only = assistant_only
        leading = self.tokenizer("", add_special_tokens=True)["input_ids"]
        self.bos = tuple(leading)  # tokens the tokenizer puts before plain text (e.g. BOS), as TRL's tokenisation has

    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def template_for(self, example: SFTExample) -> ICAPromptTemplate:
        if self.template is not None:
            return self.template
        return PAPER_TEMPLATE if example.conversational else PLAIN_TEMPLATE

    def pieces(self, example: SFTExample, demos: list[SFTExample] = ()) -> Pieces:
        """The text around the first user message's content and around the response; `demos` go before that
        message as earlier user/assistant turns (`layout="turns"`)."""
        if not example.conversational:
            eos = self.tokenizer.eos_token or ""
            return Pieces(head="", mid="", tail="" if example.response.endswith(eos) else eos)
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The dataset is conversational but the tokenizer has no chat template; set one (e.g. "
                "`SFTConfig(chat_template_path=...)` or `tokenizer.chat_template`), or use a standard-format dataset."
            )
        messages = [dict(m) for m in example.prompt]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = _USER
        turns = [(("user", d.question), ("assistant", d.response)) for d in demos]
        messages[first_user:first_user] = [{"role": r, "content": c} for pair in turns for r, c in pair]
        messages.append({"role": "assistant", "content": _ASSISTANT})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template)
        if text.count(_USER) != 1 or text.count(_ASSISTANT) != 1:
            raise ValueError("The chat template does not render message contents verbatim; ICA cannot locate them.")
        head, rest = text.split(_USER)
        mid, tail = rest.split(_ASSISTANT)
        return Pieces(head, mid, tail)

    def unconditioned(self, example: SFTExample) -> LogProbRequest:
        """log p(y | x): the prompt as TRL trains on it."""
        if isinstance(example, TokenExample):
            return LogProbRequest((), example.ids[: example.start], example.ids[example.start : example.end])
        if example.structured:
            return self._structured(example, ())
        p = self.pieces(example)
        if example.conversational:
            prefix, context = self.ids(p.head), self._context_ids(example, example.question, p)
        else:
            prefix, context = self.bos, self.ids(example.prompt)
        return self._spanned(example, LogProbRequest(prefix, *self._split_lead(example, context, p)), p)

    def _response_ids(self, example: SFTExample, p: Pieces) -> tuple[int, ...]:
        return self.ids(example.response + p.tail) if self.score_end else self.ids(example.response)

    def _split_lead(self, example: SFTExample, context: tuple, p: Pieces) -> tuple[tuple, tuple]:
        """`(context, response)`; a language-modeling row's first token moves into the context when the tokenizer
        puts no BOS before text: nothing predicts it in training, so neither request scores it."""
        response = self._response_ids(example, p)
        if not example.language_modeling or self.bos:
            return context, response
        if len(response) < 2:
            raise ValueError(f"The text {example.response!r} is one token with no BOS before it: nothing to score.")
        return context + response[:1], response[1:]

    def conditioned(self, example: SFTExample, demos: list[SFTExample]) -> LogProbRequest:
        """log p(y | D, x): the demonstrations before the candidate's question, inside the same user turn
        (`layout="in_turn"`) or as earlier turns before the unchanged question (`layout="turns"`). A pre-tokenised
        row gets the holdout rows' own token sequences, whole, before its ids."""
        if isinstance(example, TokenExample):
            if not all(isinstance(d, TokenExample) for d in demos):
                raise ValueError("Pre-tokenised rows need a pre-tokenised holdout (`input_ids`) for demonstrations.")
            prefix = tuple(t for d in demos for t in d.ids[: d.end])
            return LogProbRequest(prefix, example.ids[: example.start], example.ids[example.start : example.end])
        if example.structured:
            return self._structured(example, demos)
        if example.conversational and self.layout == "turns":
            if self.template is not None:
                raise ValueError(
                    "A demonstration template (`ica_demo_template`/`ica_query_template`, or `template`) was given for "
                    "conversational rows, but `ica_demo_layout`='turns' (the default) writes their demonstrations as "
                    "earlier chat turns and has no use for it. Set `ica_demo_layout='in_turn'` (`layout='in_turn'`, "
                    "`--demo-layout in_turn`) to put the templated demonstrations in the user turn, or drop the "
                    "template."
                )
            p = self.pieces(example, demos)
            prefix, context = self.ids(p.head), self._context_ids(example, example.question, p)
            return self._spanned(example, LogProbRequest(prefix, context, self._response_ids(example, p)), p)
        p = self.pieces(example)
        template = self.template_for(example)
        prefix_ids = self.ids(p.head + template.render_demos(demos))
        if not example.conversational:
            prefix_ids = self.bos + prefix_ids
        query = "" if example.language_modeling else template.render_query(example.question)
        request = LogProbRequest(prefix_ids, *self._split_lead(example, self._context_ids(example, query, p), p))
        return self._spanned(example, request, p)

    def _structured(self, example: SFTExample, demos) -> LogProbRequest:
        """A structured response (several messages, tool calls, `tools`), rendered as TRL renders a conversational
        prompt/completion row: the prompt with the generation prompt, then the whole conversation, the response being
        what the second adds to the first. The demonstrations are earlier turns of the same conversation (a
        structured demonstration: its own turns and tool calls whole, its tools beside the row's)."""
        self._check_structured(example)
        messages = [dict(m) for m in example.prompt]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = _USER
        messages[first_user:first_user] = [m for d in demos for m in self._demo_turns(d)]
        tools = list(example.tools or ())
        for d in demos:
            tools += [t for t in d.tools or () if t not in tools]
        kwargs = example.template_kwargs or {}
        prompt_text = self._render(messages, tools, generation_prompt=True, **kwargs)
        whole = self._render(messages + list(example.completion), tools, generation_prompt=False, **kwargs)
        if not whole.startswith(prompt_text) or prompt_text.count(_USER) != 1:
            raise ValueError(
                "The chat template renders the prompt alone (with the generation prompt) differently from the start "
                "of the whole conversation, or does not render message contents verbatim, so ICA cannot tell the "
                "response's tokens of a structured row (several messages or tool calls) from its prompt's."
            )
        head, mid = prompt_text.split(_USER)
        response = self.ids(whole[len(prompt_text) :])
        if demos:  # the same tokens scored with and without demonstrations
            plain = self._structured(example, ())
            if plain.response != response:
                raise ValueError(
                    "The chat template renders a structured row's response (several messages or tool calls) with "
                    "different tokens after earlier turns than without them, so the conditioned and unconditioned "
                    "scores would not score the same tokens."
                )
            return LogProbRequest(self.ids(head), self.ids(example.question + mid), response, plain.scored)
        return LogProbRequest(
            self.ids(head), self.ids(example.question + mid), response, self._loss_positions(example, response)
        )

    def _check_structured(self, example: SFTExample) -> None:
        what = "A row whose response is several messages or tool calls, or that has `tools` or `chat_template_kwargs`,"
        if self.layout != "turns":
            raise ValueError(
                f"{what} gets its demonstrations as earlier turns: set `ica_demo_layout='turns'` (the "
                f"default), not {self.layout!r}."
            )
        if self.template is not None:
            raise ValueError(
                f"{what} gets its demonstrations as chat turns, which a demonstration template "
                "(`ica_demo_template`) does not write; drop the template."
            )
        if self.span is not None:
            raise ValueError(
                f"{what} is scored over the tokens training covers; `ica_score_span`={self.span!r} "
                "scores part of a text response. Leave it unset."
            )
        if not self.score_end:
            raise ValueError(
                f"{what} is scored over every token training covers, the turns' closing tokens among "
                "them; `ica_score_end_token=False` cannot leave them out. Set it to True."
            )

    def _demo_turns(self, demo: SFTExample) -> list[dict]:
        if demo.structured:  # the demonstration's own conversation, its system message aside
            return [dict(m) for m in demo.prompt if m["role"] != "system"] + [dict(m) for m in demo.completion]
        return [{"role": "user", "content": demo.question}, {"role": "assistant", "content": demo.response}]

    def _render(self, messages: list[dict], tools: list[dict], generation_prompt: bool, **template_kwargs) -> str:
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            self.pieces(SFTExample(messages, "", ""))  # raises the error that names the missing chat template
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=self.chat_template,
            **template_kwargs,
        )

    def _loss_positions(self, example: SFTExample, response: tuple[int, ...]) -> tuple[int, ...] | None:
        """The response tokens the loss covers: every one (None), or under `assistant_only` those the chat
        template's assistant mask marks in the whole conversation, as TRL builds its labels."""
        if not self.assistant_only:
            return None
        out = self.tokenizer.apply_chat_template(
            [*example.prompt, *example.completion],
            tools=list(example.tools or ()) or None,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=self.chat_template,
            **(example.template_kwargs or {}),
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        n = len(response)
        if ids[-n:] != list(response):
            raise ValueError(
                "The chat template's tokens of a whole conversation do not end with the response's tokens as ICA "
                "renders it, so `assistant_only_loss`'s mask cannot be placed on them."
            )
        positions = tuple(k for k in range(n) if mask[len(ids) - n + k])
        if not positions:
            raise ValueError(
                "`assistant_only_loss=True`, but the chat template marks no assistant token in a row's response: "
                "it needs the `{% generation %}` keyword around assistant turns (as TRL requires)."
            )
        return positions

    def span_tokens(self, example: SFTExample, p: Pieces | None = None) -> tuple[int, int] | None:
        """`(k, j)`: the response tokens `[k, j)` (of [`_response_ids`]) that `span` scores, or None without a span."""
        if example.language_modeling:
            raise ValueError(
                "`ica_score_span` scores part of a response after a prompt; language-modeling rows have "
                "no prompt. Use prompt/completion or conversational rows, or no span."
            )
        chars = span_chars(example.response, self.span)
        if chars is None:
            return None
        tail = (p.tail if p is not None else self.pieces(example).tail) if self.score_end else ""
        text = example.response + tail
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        start, end = chars
        if end == len(example.response.rstrip("\n")):  # a span that ends the response takes its closing too
            end = len(text)
        k = next(i for i, (_, stop) in enumerate(offsets) if stop > start)
        j = max(i for i, (first, _) in enumerate(offsets) if first < end) + 1
        return k, j

    def _spanned(self, example: SFTExample, request: LogProbRequest, p: Pieces) -> LogProbRequest:
        """`request` with only the span scored: the response tokens before it join the context, those after it
        are dropped (nothing after them is scored); unchanged without a `span`."""
        if self.span is None:
            return request
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("`ica_score_span` needs a fast tokenizer (character offsets) to find the span's tokens.")
        found = self.span_tokens(example, p)
        if found is None:  # no span: a one-token request keeps it valid; the builder scores the row -inf
            return LogProbRequest(request.prefix, request.context + request.response[:-1], request.response[-1:])
        k, j = found
        return LogProbRequest(request.prefix, request.context + request.response[:k], request.response[k:j])

    def _context_ids(self, example: SFTExample, user_text: str, p: Pieces) -> tuple[int, ...]:
        if not example.conversational:
            return self.ids(user_text)
        # Only the first user message's content is replaced; later prompt messages are rendered in `mid`.
        return self.ids(user_text + p.mid)
