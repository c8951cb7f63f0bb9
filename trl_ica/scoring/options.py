"""What defines an ICA score, in one frozen object built once (from a trainer config, the command line or
`compute_ica_scores`'s keywords) and passed down: the scoring functions read it, and a scores file's record, a
checkpoint's fingerprint and the model card are written from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..presets import scoring_settings
from .demonstrations import DEMO_SELECTIONS, check_choice
from .rendering import (
    AUTO,
    DEFAULT_DEMO_LAYOUT,
    DEMO_LAYOUTS,
    WHOLE,
    ICAPromptTemplate,
    Renderer,
    auto_span,
    check_span,
)

#: How token log-probabilities are reduced: summed over the response (the paper's) or averaged per token.
REDUCTIONS = ("sum", "mean")
#: The score: log p(y | D, x) - log p(y | x) (the paper's), or log p(y | D, x) alone.
FORMS = ("difference", "conditioned")
#: Demonstration selections that draw with the seed (the others are determined by the data).
SEEDED_SELECTIONS = ("knn_grouped", "fixed", "random")


@dataclass(frozen=True)
class ICAScoringOptions:
    """The settings that define an ICA score; every choice is checked here, once. The defaults are the recommended
    settings, the trainers' own (`ica_preset="recommended"`); [`from_preset`] gives the paper's.

    Args:
        num_demos (`int`): k, holdout demonstrations per candidate.
        demo_selection (`str`): how they are chosen (see [`select_demos`]).
        form (`str`): `"difference"` or `"conditioned"`.
        reduction (`str`): `"sum"` or `"mean"`.
        layout (`str`): where a conversational row's demonstrations go (see [`Renderer`]).
        score_end (`bool`): score the token that closes each response.
        template ([`ICAPromptTemplate`], *optional*): the in-turn demonstration wording.
        chat_template (`str`, *optional*): a chat template that overrides the tokenizer's.
        embedding_model (`str` or callable, *optional*): the kNN encoder; None for the model's own hidden states.
        seed (`int`): seed of the seeded selections.
        span (`str`, *optional*): score only a span of each response rather than all of it
            (see [`Renderer`]): `"last_line"`, or a regular expression whose last match in the response is the span
            (e.g. `"#### .*"` for a final answer); `"response"` (or None): the whole response; `"auto"`: the last
            line where every row allows a span and the whole response otherwise, decided when the rows are read
            ([`resolve`], [`auto_span`]).
        assistant_only (`bool`): `SFTConfig.assistant_only_loss`: a response of several messages or tool calls is
            scored on its assistant tokens only, as that loss covers them (see [`Renderer`]).
    """

    num_demos: int = 3
    demo_selection: str = "knn"
    form: str = "conditioned"
    reduction: str = "mean"
    layout: str = DEFAULT_DEMO_LAYOUT
    score_end: bool = True
    template: ICAPromptTemplate | None = None
    chat_template: str | None = None
    embedding_model: str | Callable | None = None
    seed: int = 0
    span: str | None = None
    assistant_only: bool = False

    def __post_init__(self):
        check_span(self.span)
        if self.span == WHOLE:  # one spelling of the whole response, as records before `"response"` have it
            object.__setattr__(self, "span", None)
        check_choice("demo_selection", self.demo_selection, DEMO_SELECTIONS)
        check_choice("form", self.form, FORMS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("layout", self.layout, DEMO_LAYOUTS)
        if not isinstance(self.num_demos, int) or isinstance(self.num_demos, bool) or self.num_demos < 1:
            raise ValueError(
                f"`num_demos` must be a positive integer, at most the holdout's size, got {self.num_demos!r}."
            )
        if not isinstance(self.score_end, bool):
            raise ValueError(f"`score_end` must be True or False, got {self.score_end!r}.")
        if not isinstance(self.assistant_only, bool):
            raise ValueError(f"`assistant_only` must be True or False, got {self.assistant_only!r}.")
        if self.template is not None and not isinstance(self.template, ICAPromptTemplate):
            raise ValueError(f"`template` must be an ICAPromptTemplate, got {type(self.template).__name__}.")
        encoder = self.embedding_model
        if not (encoder is None or isinstance(encoder, str) or callable(encoder)):
            raise ValueError(
                f"`embedding_model` must be None (the model's own hidden states), a sentence-transformers name or "
                f"path, or a callable, got {type(self.embedding_model).__name__}."
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}.")

    @classmethod
    def from_preset(cls, preset: str = "recommended", **fields) -> ICAScoringOptions:
        """The options of `preset` (`"recommended"` or `"paper"`: the paper's summed difference, demonstrations in
        the user turn, the response's own tokens, whole responses), with `fields` given explicitly winning over it."""
        names = {
            "ica_score_form": "form",
            "ica_reduction": "reduction",
            "ica_demo_layout": "layout",
            "ica_score_end_token": "score_end",
            "ica_score_span": "span",
        }
        return cls(**{**{names[k]: v for k, v in scoring_settings(preset).items()}, **fields})

    def resolve(self, tokenizer, examples, holdout) -> tuple[ICAScoringOptions, str | None]:
        """These options with `span="auto"` decided for the read rows `examples` and `holdout` (see [`auto_span`]),
        and why the whole response is scored where `"auto"` falls back to it (None otherwise)."""
        if self.span != AUTO:
            return self, None
        span, reason = auto_span(tokenizer, examples, holdout)
        return replace(self, span=span), reason

    @property
    def seeded(self) -> bool:
        """Whether the seed changes the demonstrations."""
        return self.demo_selection in SEEDED_SELECTIONS

    def renderer(self, tokenizer) -> Renderer:
        return Renderer(
            tokenizer, self.template, self.chat_template, self.layout, self.score_end, self.span, self.assistant_only
        )

    def record(self) -> dict:
        """The settings under the trainers' `ica_*` names, as JSON values: what `trl-ica score` writes beside its
        scores, what a checkpoint's fingerprint and the model card hold. A callable encoder is recorded by name."""
        encoder = self.embedding_model
        if encoder is not None and not isinstance(encoder, str):
            encoder = getattr(encoder, "__qualname__", type(encoder).__name__)
        return {
            "ica_score_form": self.form,
            "ica_reduction": self.reduction,
            "ica_num_demos": self.num_demos,
            "ica_demo_selection": self.demo_selection,
            "ica_embedding_model": encoder,
            "ica_demo_layout": self.layout,
            "ica_score_end_token": self.score_end,
            "ica_demo_template": None if self.template is None else self.template.demo,
            "ica_query_template": None if self.template is None else self.template.query,
            "ica_seed": self.seed,
            "ica_score_span": self.span,
            # TRL's own field, recorded only when it changes the scored tokens (so earlier records still match)
            **({"assistant_only_loss": True} if self.assistant_only else {}),
        }

    def comparable(self) -> dict:
        """[`record`] without the seed when it changes nothing (kNN): the settings two scorings must share to give
        the same scores."""
        out = self.record()
        if not self.seeded:
            out.pop("ica_seed")
        return out
