"""Requests of training rows that arrive while training runs (a `datasets.IterableDataset`), scored step by step."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

from .demonstrations import select_demos
from .formats import PreferenceExample, SFTExample, read_row
from .ica import ICARequestBuilder, holdout_copies, read_holdout, resolve_embedder
from .options import ICAScoringOptions
from .rendering import AUTO, auto_fallback

#: Demonstration choices that give a row the same demonstrations whatever rows come with it: `fixed` (one shared
#: draw), `random` (a draw seeded by the row's index), `knn` (its own nearest holdout rows). `knn_grouped` compares
#: all the candidates, which a stream never has at once.
STREAMED_SELECTIONS = ("fixed", "random", "knn")


class StreamedRequestBuilder(ICARequestBuilder):
    """An [`ICARequestBuilder`] whose candidates are added as they arrive ([`add`]): each new row is read, given its
    demonstrations and length-checked then. Only the rows of the latest [`add`] are kept; `demo_indices` grows with
    the highest index seen (`-1` for a row not seen).

    `knn` embeds each row as it arrives and the holdout once, with the first rows: with the trained model's own
    hidden states (the default embedder) a row that arrives later is compared with holdout embeddings of the model
    as it was then, which saves embedding the whole holdout again at every step.

    Args:
        tokenizer: the model's tokenizer.
        holdout (`list[SFTExample]`): the read holdout (of a preference holdout, each prompt with its chosen answer).
        options ([`ICAScoringOptions`]): what defines the score; `demo_selection` one of [`STREAMED_SELECTIONS`].
        embed (`Callable`, *optional*): the embedder of `knn`.
        max_length (`int`, *optional*): the longest conditioned request allowed, named by `argument` when exceeded.
        pairs (`bool`, *optional*, defaults to `False`): the rows are preference pairs, scored by their margin.
    """

    def __init__(
        self,
        tokenizer,
        holdout,
        options: ICAScoringOptions,
        embed=None,
        max_length=None,
        argument: str = "max_length",
        pairs: bool = False,
    ):
        if options.demo_selection not in STREAMED_SELECTIONS:
            raise ValueError(
                f"Rows that stream in (an IterableDataset) need demonstrations chosen row by row: `demo_selection` "
                f"must be one of {list(STREAMED_SELECTIONS)}, got {options.demo_selection!r}, which compares every "
                "row of the training set."
            )
        self.span_reason = None
        if options.span == AUTO:  # a span is all or nothing, and rows that have not arrived cannot be checked
            options = replace(options, span=None)
            self.span_reason = auto_fallback("rows that stream in cannot be checked up front")
        self.options = options
        self.renderer = options.renderer(tokenizer)
        self.tokenizer = tokenizer
        self.candidates: dict[int, SFTExample] = {}
        self.holdout = holdout
        self._pending = None
        self.pairs, self.width = pairs, 2 if pairs else 1
        self.embed = embed
        self.max_length, self.argument = max_length, argument
        self.demo_indices = np.zeros((0, options.num_demos), dtype=np.int64)
        self._holdout_vectors = None  # `knn`: the holdout's embeddings, computed with the first rows
        self._copies_warned = False

    def add(self, indices, rows) -> None:
        """Read the rows `rows` (mappings: rows SFTTrainer trains on, or preference pairs) of the training examples
        `indices`, choose the demonstrations of those not seen before and check their lengths. The rows of earlier
        calls are forgotten (their demonstrations are kept)."""
        indices = [int(i) for i in indices]
        examples = [read_row(row, i, "train_dataset") for i, row in zip(indices, rows)]
        wrong = [i for i, e in zip(indices, examples) if isinstance(e, PreferenceExample) != self.pairs]
        if wrong:
            wanted = "preference pairs" if self.pairs else "single responses"
            raise ValueError(
                f"Streamed `train_dataset` rows {wrong[:5]} are not {wanted}, as the stream's first row is."
            )
        self.candidates = dict(zip(indices, examples))
        table = self.demo_indices
        if max(indices, default=-1) >= len(table):
            grown = np.full((max(indices) + 1, table.shape[1]), -1, dtype=np.int64)
            grown[: len(table)] = table
            table = grown
        new = [i for i in dict.fromkeys(indices) if table[i, 0] < 0]
        questions = [self.candidates[i].question for i in new]
        holdout = [h.question for h in self.holdout]
        k, selection, seed = self.options.num_demos, self.options.demo_selection, self.options.seed
        embed = self.embed
        if selection == "knn":
            # Every process embeds at every step, its own new rows or none: the model's embedding forwards are
            # kept in step between processes (collective under sharded models), never dealt out between them
            if self._holdout_vectors is None:
                self._holdout_vectors = np.asarray(self.embed(holdout))
            vectors = np.asarray(self.embed(questions))
            embed = lambda texts: vectors  # noqa: E731 - select_demos asks for `questions` only
        if new:
            # a row that is also a holdout row is kept out of its own demonstrations, as in a Dataset's scoring (the
            # warning that says so is given once per run, not at every step)
            with warnings.catch_warnings(record=not self._copies_warned) as caught:
                if self._copies_warned:
                    warnings.simplefilter("ignore")
                exclude = holdout_copies([self.candidates[i] for i in new], self.holdout, k)
            if caught:
                self._copies_warned = True
                warnings.warn(
                    str(caught[0].message) + " (streamed rows: counted in the first step that has any)", stacklevel=2
                )
            table[new] = select_demos(
                questions, holdout, k, selection, seed, embed, exclude, rows=new, holdout_vectors=self._holdout_vectors
            )
        self.demo_indices = table
        if new:
            self._check_new_lengths(new)

    def _check_new_lengths(self, new: list[int]) -> None:
        if self.max_length is None:
            return
        lengths = {i: max(r.num_tokens for r in self.requests(i, True)) for i in new}
        too_long = [i for i, n in lengths.items() if n > self.max_length]
        if too_long:
            raise ValueError(
                f"Streamed training rows {too_long[:5]} are longer than `{self.argument}`={self.max_length} tokens "
                f"with their demonstrations (up to {max(lengths.values())}). Raise `{self.argument}` if the model's "
                "context allows it, give fewer demonstrations (`ica_num_demos`), or use shorter holdout examples."
            )

    def check_lengths(self, max_length: int | None, argument: str = "max_length") -> None:
        """Lengths are checked row by row as the rows arrive ([`add`])."""


def prepare_streamed_ica(
    model,
    tokenizer,
    holdout,
    options: ICAScoringOptions,
    *,
    max_length=None,
    max_length_argument="max_length",
    show_progress: bool = False,
    compute_dtype=None,
    pairs: bool = False,
) -> StreamedRequestBuilder:
    """The [`StreamedRequestBuilder`] of a training set that streams in (of preference pairs when `pairs`): the
    holdout is read now, rows as they come."""
    held = read_holdout(holdout, tokenizer, options.num_demos)
    embed = None
    if options.demo_selection == "knn":
        embed = resolve_embedder(
            model, tokenizer, options.embedding_model, show_progress, compute_dtype, distributed="lockstep"
        )
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_length_argument = "the model's max_position_embeddings"
    builder = StreamedRequestBuilder(tokenizer, held, options, embed, max_length, max_length_argument, pairs)
    if builder.span_reason is not None and not pairs:
        warnings.warn(builder.span_reason, stacklevel=2)
    return builder
