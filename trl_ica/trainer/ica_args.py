"""The `ica_*` configuration fields shared by every ICA trainer config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

from ..presets import PRESET_FIELDS, PRESETS, apply_preset, preset_weight_mode
from ..scoring.demonstrations import DEMO_SELECTIONS
from ..scoring.options import FORMS, REDUCTIONS, ICAScoringOptions
from ..scoring.planner import SHARINGS
from ..scoring.rendering import AUTO, DEMO_LAYOUTS, WHOLE, ICAPromptTemplate, check_span
from ..scoring.weighting import BATCH_WEIGHTINGS, POOL_WEIGHTINGS, WEIGHTINGS, check_token_quantile


def check_fixed_scorer(scorer, refresh) -> None:
    """Refuse what a fixed scorer cannot do: rescoring (`ica_refresh` > 1) would compute the same scores again."""
    if not isinstance(scorer, str) and scorer is not None and not hasattr(scorer, "config"):
        raise ValueError(f"`ica_scoring_model` must be a Hub id or a model folder, got {type(scorer).__name__}.")
    if refresh != "online" and refresh != 1:
        raise ValueError(
            f"`ica_refresh`={refresh!r} rescores the training set during training, but a scoring model of its own "
            "(`ica_scoring_model`) is never trained: every scoring would give the same scores. Use `ica_refresh=1` "
            "(score once before training), or 'online' for a streamed train_dataset."
        )


def scoring_options(args, chat_template: str | None = None) -> ICAScoringOptions:
    """The [`ICAScoringOptions`] of a trainer config's `ica_*` fields (after `ica_preset` has filled them): the seed
    is `ica_seed`, else the run's `seed`; `assistant_only_loss` is SFTConfig's."""
    template = None
    if args.ica_demo_template is not None:
        template = ICAPromptTemplate(args.ica_demo_template, args.ica_query_template)
    return ICAScoringOptions(
        num_demos=args.ica_num_demos,
        demo_selection=args.ica_demo_selection,
        form=args.ica_score_form,
        reduction=args.ica_reduction,
        layout=args.ica_demo_layout,
        score_end=args.ica_score_end_token,
        template=template,
        chat_template=chat_template,
        embedding_model=args.ica_embedding_model,
        seed=args.seed if args.ica_seed is None else args.ica_seed,
        span=getattr(args, "ica_score_span", None),
        assistant_only=bool(getattr(args, "assistant_only_loss", False)),
    )


@dataclass(frozen=True)
class ICATrainingOptions:
    """How a run turns scores into training: the `ica_*` fields besides the score's own ([`ICAScoringOptions`]),
    read once from a validated config ([`training_options`]) so that the controller and the weigher hold these and
    not the whole config. Each field is the config field `ica_<name>` (`show_progress` is `not disable_tqdm`)."""

    weighting: str
    holdout_cutoff: float
    holdout_rescore_steps: int
    refresh: int | str
    max_length: int | None
    loss_reduction: str
    weight_mode: str
    token_quantile: float | None
    scoring_batch_size: int | None
    scoring_max_tokens: int | None
    scoring_sharing: str
    scoring_overhead: float | str | None
    show_progress: bool = True

    @property
    def online(self) -> bool:
        return self.refresh == "online"

    def record(self) -> dict:
        """The fields saved state depends on, under their config names (`STATE_FIELDS`): a checkpoint's fingerprint."""
        from .state import STATE_FIELDS

        return {name: getattr(self, name.removeprefix("ica_")) for name in STATE_FIELDS}


def training_options(args) -> ICATrainingOptions:
    """The [`ICATrainingOptions`] of a validated trainer config (after `ica_preset` has filled it)."""
    names = [f.name for f in fields(ICATrainingOptions) if f.name != "show_progress"]
    return ICATrainingOptions(
        **{name: getattr(args, f"ica_{name}") for name in names},
        show_progress=not getattr(args, "disable_tqdm", False),
    )


#: How the weighted per-example losses of an optimizer step are reduced (`ica_loss_reduction`).
LOSS_REDUCTIONS = ("token_mean", "weighted_mean")
#: Where the weights act (`ica_weight_mode`): on each example's loss, or on how often it is drawn.
WEIGHT_MODES = ("loss", "sampling")


@dataclass
class ICAArguments:
    r"""
    ICA fields added to a TRL config.

    The fields that define the score and the weights (`ica_score_form`, `ica_reduction`, `ica_demo_layout`,
    `ica_score_end_token`, `ica_weight_mode`, `ica_weighting`) default to None, filled from `ica_preset` (see
    `trl_ica.presets`); a field set explicitly always wins.

    Parameters:
        ica_preset (`str`, *optional*, defaults to `"recommended"`):
            where unset score and weighting fields come from. `"recommended"`: what the benchmarks measured best
            (docs/benchmarks.md): the conditioned form per token, demonstrations as earlier turns, the closing token
            scored; for SFT the rows drawn by `"holdout_posterior"` weights (`ica_weight_mode="sampling"`, or
            `"holdout_quantile"` loss weights where the trainer cannot draw single rows), for preference pairs
            `"batch_minmax"` loss weights. `"paper"`: arXiv 2510.14459 as specified: `"difference"`, `"sum"`,
            `"in_turn"`, no closing token, `"batch_minmax"` loss weights.
        ica_num_demos (`int`, *optional*, defaults to `3`):
            k, the holdout demonstrations put in context for each example.
        ica_demo_selection (`str`, *optional*, defaults to `"knn"`):
            `"knn"` (the nearest holdout prompts, most similar first), `"knn_grouped"` (examples grouped by
            embedding, each group the holdout prompts nearest its centre: one prefix per group), `"fixed"` (one
            seeded set for everyone) or `"random"` (seeded per example).
        ica_embedding_model (`str`, *optional*):
            sentence-transformers encoder (name or path) for kNN; by default the model's own mean-pooled hidden states.
        ica_weighting (`str`, *optional*, defaults to the preset's):
            recommended: `"holdout_posterior"` for SFT under sampling, `"holdout_quantile"` for SFT loss weights,
            `"batch_minmax"` for pairs; paper: `"batch_minmax"` (`"holdout_posterior"` under sampling).
            `"batch_minmax"` (the paper's), `"global_minmax"`, `"holdout_quantile"`, `"holdout_posterior"` or
            `"none"`. `"batch_minmax"` compares the examples of one optimizer step: every micro-batch of gradient
            accumulation on every process. `"holdout_quantile"` weights each example by where its score falls
            among the holdout's own scores (each holdout row scored with demonstrations from the rest of the holdout):
            the share of them it beats, whatever else is in its batch. `"holdout_posterior"` weights it by the
            probability that it is holdout-like given its score, the training set's scores read as a mixture of
            holdout-like rows and others (its share estimated too): clean rows keep weights near 1, rows unlike the
            holdout go to 0. It needs every row's score, so it is refused online.
        ica_holdout_cutoff (`float`, *optional*, defaults to `1.0`):
            with `"holdout_quantile"`: the share of the holdout's own scores an example must beat for full weight;
            below it the weight falls in proportion, to 0 below every holdout score. `1.0`: the weight is the share
            beaten (a median holdout row would get 0.5); `0.1`: an example that scores like the holdout's lowest tenth
            or better trains at full weight, and only examples unlike the holdout lose weight. Set with
            `ica_weighting` unset, it makes the weighting `"holdout_quantile"` (under sampling too).
        ica_holdout_rescore_steps (`int`, *optional*, defaults to `1`):
            online with `"holdout_quantile"`: the holdout's own scores are recomputed every this many steps (with
            `ica_refresh=R`, at every refresh). At 1 each step's rows are compared with holdout scores of the same
            model; a larger value saves scorings of the holdout but compares the rows with an older model's scores,
            which cost a measured run most of its gain (docs/benchmarks.md).
        ica_weight_mode (`str`, *optional*, defaults to the preset's):
            recommended: `"sampling"` for SFT, or `"loss"` where a setting the user chose rules sampling out (listed
            below; the trainer logs why), and `"loss"` for pairs; paper: `"loss"`. Where the weights act. `"loss"`:
            each example's loss is multiplied by its weight. `"sampling"`: the weights become sampling probabilities
            through the trainer's sampler: an epoch draws as many rows as the training set has, each about
            `n * w / sum(w)` times, shuffled as the stock sampler shuffles; every batch is full, the loss is the stock
            loss, and a row of weight 0 is never drawn (costs no compute). A refresh (`ica_refresh` > 1) redraws the
            rest of the epoch from the new weights. It needs weights that compare a row with the holdout or the whole
            training set, not with its batch: an unset `ica_weighting` becomes `"holdout_posterior"`, and
            `"batch_minmax"` is refused, as are online scoring (no weight exists before a row is drawn), packing (the
            sampler draws packed sequences, not examples), a streamed `train_dataset` (no sampler),
            `train_sampling_strategy` other than `"random"` and `ica_loss_reduction="weighted_mean"`.
        ica_loss_reduction (`str`, *optional*, defaults to `"token_mean"`):
            how the weighted losses of an optimizer step (all its micro-batches and processes) are reduced.
            `"token_mean"`: the trainer's own divisor, `sum_i w_i * nll_i / sum_i n_i` (n_i: example i's loss
            tokens; a pair counts 1), so lower weights scale the step's loss down. `"weighted_mean"`:
            `sum_i w_i * nll_i / sum_i w_i * n_i`, which keeps the loss at the stock loss's scale whatever the mean
            weight (AdamW cancels a scale shared by every step, so the two differ in how steps weigh against each
            other). Both equal the stock loss with all weights 1. Under `"weighted_mean"` a step of one example
            trains on it unweighted.
        ica_refresh (`int` or `str`, *optional*, defaults to `1`):
            R, the number of scorings spread over training (R = 1: once before training), or `"online"` (each optimizer
            step scored at its start with the current parameters).
        ica_reduction (`str`, *optional*, defaults to the preset's):
            recommended: `"mean"`; paper: `"sum"`. `"sum"` of the response's token log-probabilities (the paper's) or
            `"mean"` per token.
        ica_score_form (`str`, *optional*, defaults to the preset's):
            recommended: `"conditioned"`; paper: `"difference"`. `"difference"`, log p(y | D, x) - log p(y | x) (the
            paper's); or `"conditioned"`, log p(y | D, x) alone, which also weights down responses that do not fit
            their own prompt (noisy labels) and skips the pass without demonstrations. Pair it with
            `ica_reduction="mean"`. See docs/scores.md.
        ica_demo_template (`str`, *optional*):
            one demonstration, with `{prompt}` and `{response}`; with `ica_query_template`, replaces the default
            wording.
        ica_query_template (`str`, *optional*):
            the example's question after the demonstrations, with `{prompt}`.
        ica_demo_layout (`str`, *optional*, defaults to the preset's):
            recommended: `"turns"`; paper: `"in_turn"`. Where a conversational row's demonstrations go: `"turns"`, each
            an earlier user/assistant exchange before the row's unchanged turn, so the requests with and without
            demonstrations differ by the demonstrations alone; or `"in_turn"`, in the row's user turn with the paper's
            wording (or `ica_demo_template`, which conversational rows need this layout for). Standard rows always get
            few-shot text. `"turns"` ranked and trained as well or better on every pool measured; see docs/scores.md.
        ica_score_end_token (`bool`, *optional*, defaults to the preset's):
            recommended: `True`; paper: `False` (only the response's own tokens). Score the token that closes each
            response (the chat template's end of turn, or EOS for standard rows) with it, as TRL trains it.
        ica_score_span (`str`, *optional*, defaults to the preset's):
            recommended: `"response"`; paper: `"response"` (the whole response). Score only a span of each response,
            the rest of the response given as context: `"last_line"`, or a regular expression whose last match in the
            response is the span (`"#### .*"`: GSM8K's final answer). A wrong final number changes a few of a
            solution's ~130 tokens, which a score averaged over the whole response hardly sees; the span's
            log-probability given the demonstrations and the solution before it does. A response without the span
            scores -inf (weight 0); every holdout response must have one. A span needs SFT rows with a prompt and a
            text response (not language modeling, not several messages or tool calls, not pairs) and a fast
            tokenizer. `"auto"`: the last line where every training and holdout row allows a span, the whole
            response otherwise (with a warning that says why), for preference pairs (scored by their margin) and
            with `ica_token_quantile` (which scores every token). See docs/training.md.
        ica_token_quantile (`float`, *optional*):
            SFT: drop from the loss the response tokens that the model, with the row's demonstrations in context,
            finds less likely than this quantile of the holdout's own tokens (each holdout response scored with
            demonstrations from the rest of the holdout), e.g. `0.01`. The token log-probs come from the scoring
            pass with demonstrations, so masks are refreshed with the scores; a dropped token's loss is 0 and it
            still counts in the loss divisor, as a row of weight 0 does. Works with any `ica_weighting` (`"none"`:
            masks alone) and either `ica_weight_mode`; not online, with a span, with given scores or with
            `ica_score_end_token=False`. A row that training truncates (`max_length`) keeps the start of its mask.
            None: no mask.
        ica_scoring_batch_size (`int`, *optional*):
            most sequences per scoring forward; by default the token budget decides.
        ica_scoring_max_tokens (`int`, *optional*):
            token positions one scoring forward may hold: for each sequence, the demonstration prefix it attends to
            plus its own padded tokens. Defaults to 16384 on an accelerator and 2048 on the CPU. After an out-of-memory
            error the budget is halved for the rest of the run, on every process (they learn of it at the next
            scoring step and retry together; under FSDP and ZeRO-3, whose forwards gather parameters, the error stops
            every process with a message naming this setting).
        ica_scoring_sharing (`str`, *optional*, defaults to `"auto"`):
            how demonstration prefixes share their KV cache: `"tree"` (the common start of different prefixes runs
            once, in the most forwards), `"flat"` (whole prefixes used more than once run once), `"none"` (every
            sequence whole, in the fewest forwards), or `"auto"`, the cheapest by a cost model that charges each
            forward `ica_scoring_overhead` tokens. The scores are the same up to rounding.
        ica_scoring_overhead (`float` or `str`, *optional*):
            that fixed cost per scoring forward, in tokens' worth of compute; by default 32 on the CPU and 256 on an
            accelerator, 1024 there where every forward dequantises (QLoRA) or gathers (ZeRO-3, FSDP) every weight
            (an estimate: `scripts/gpu_check.py` measures it); `"measure"` times it once per run on the model.
        ica_max_length (`int`, *optional*):
            longest conditioned sequence allowed (demonstrations included); defaults to the model's context size
            (`max_position_embeddings`). The training `max_length` does not bound it: a row longer than this with its
            demonstrations is refused before training, with the rows named.
        ica_seed (`int`, *optional*):
            seed of fixed and random demonstrations; defaults to `seed`.
        ica_scoring_model (`str`, *optional*):
            a model (Hub id or folder) that computes the scores instead of the model being trained, with its own
            tokenizer and chat template (weights are per example, so the tokenizers need not match). It is loaded in
            the training precision on the training device and never trained; the trainers' `scoring_model=` takes a
            loaded model instead. Its scores do not change, so it scores once: with `ica_refresh=1` before training,
            after which it is freed, or with `"online"` each step's rows as they arrive (what a streamed
            `train_dataset` needs; it then stays loaded), the holdout's own scores once; `ica_refresh` > 1 is
            refused. A larger scorer sees noise a small trained model cannot; a smaller one costs less than scoring
            with the trained model (docs/benchmarks.md, "A scoring model of its own").
        ica_scores_file (`str`, *optional*):
            scores written by `trl-ica score --method ica` for these training rows, used as the one scoring of
            `ica_refresh=1` instead of scoring before training. The file's rows must be the training rows, in order,
            and its recorded form, reduction, demonstrations and seed must be this run's (`<file>.meta.json`).
    """

    ica_preset: str = field(
        default="recommended",
        metadata={"help": "Where unset score and weighting fields come from.", "choices": list(PRESETS)},
    )
    ica_num_demos: int = field(default=3, metadata={"help": "Holdout demonstrations put in context per example."})
    ica_demo_selection: str = field(
        default="knn", metadata={"help": "How demonstrations are chosen.", "choices": list(DEMO_SELECTIONS)}
    )
    ica_embedding_model: str | None = field(
        default=None, metadata={"help": "sentence-transformers encoder for kNN; default: the model's hidden states."}
    )
    ica_weighting: str | None = field(
        default=None,
        metadata={"help": "From scores to weights; default: the preset's.", "choices": list(WEIGHTINGS)},
    )
    ica_holdout_cutoff: float = field(
        default=1.0,
        metadata={"help": "holdout_quantile: share of the holdout's own scores an example must beat for weight 1."},
    )
    ica_holdout_rescore_steps: int = field(
        default=1, metadata={"help": "Online holdout_quantile: steps between scorings of the holdout itself."}
    )
    ica_weight_mode: str | None = field(
        default=None,
        metadata={
            "help": "Weights multiply each example's loss, or set how often it is drawn; default: the preset's.",
            "choices": list(WEIGHT_MODES),
        },
    )
    ica_loss_reduction: str = field(
        default="token_mean",
        metadata={
            "help": "Divide the weighted loss by the step's tokens, or by its weighted tokens.",
            "choices": list(LOSS_REDUCTIONS),
        },
    )
    ica_refresh: str = field(
        default="1", metadata={"help": "Number of scorings over training (1: before training), or 'online'."}
    )
    ica_reduction: str | None = field(
        default=None,
        metadata={"help": "Sum or per-token mean; default: the preset's.", "choices": list(REDUCTIONS)},
    )
    ica_score_form: str | None = field(
        default=None,
        metadata={
            "help": "The paper's difference, or log p(y | D, x) alone; default: the preset's.",
            "choices": list(FORMS),
        },
    )
    ica_demo_template: str | None = field(default=None, metadata={"help": "One demonstration: {prompt}, {response}."})
    ica_query_template: str | None = field(default=None, metadata={"help": "The question after demos: {prompt}."})
    ica_demo_layout: str | None = field(
        default=None,
        metadata={"help": "Chat rows: demos as earlier turns, or in the user turn.", "choices": list(DEMO_LAYOUTS)},
    )
    ica_score_end_token: bool | None = field(
        default=None, metadata={"help": "Score the end-of-turn (or EOS) token after each response."}
    )
    ica_score_span: str | None = field(
        default=None,
        metadata={"help": "Score only this span of each response: 'auto', 'last_line', 'response' or a regex."},
    )
    ica_token_quantile: float | None = field(
        default=None,
        metadata={"help": "SFT: drop tokens less likely with demonstrations than this quantile of the holdout's."},
    )
    ica_scoring_batch_size: int | None = field(default=None, metadata={"help": "Sequences per scoring forward."})
    ica_scoring_max_tokens: int | None = field(
        default=None, metadata={"help": "Token positions per scoring forward, prefixes included."}
    )
    ica_scoring_sharing: str = field(
        default="auto",
        metadata={"help": "How demonstration prefixes share their KV cache.", "choices": list(SHARINGS)},
    )
    ica_scoring_overhead: float | str | None = field(
        default=None, metadata={"help": "Fixed cost of a scoring forward in tokens, or 'measure'."}
    )
    ica_max_length: int | None = field(default=None, metadata={"help": "Longest conditioned sequence allowed."})
    ica_seed: int | None = field(default=None, metadata={"help": "Seed of fixed/random demos; default `seed`."})
    ica_scoring_model: str | None = field(
        default=None, metadata={"help": "A fixed model (Hub id or folder) that scores instead of the trained one."}
    )
    ica_scores_file: str | None = field(
        default=None, metadata={"help": "`trl-ica score` output to use as the R = 1 scores instead of scoring."}
    )

    def _sampling_conflict(self, streamed: bool = False) -> str | None:
        """Why `ica_weight_mode="sampling"` cannot run with the other settings (or on a streamed training set), or
        None: sampling draws single rows of a Dataset by weights fixed before they are drawn."""
        if self.ica_weighting in BATCH_WEIGHTINGS:
            return (
                f"`ica_weight_mode='sampling'` draws rows by their weights before any batch exists, but "
                f"`ica_weighting={self.ica_weighting!r}` compares the rows of one batch. Use 'holdout_posterior' "
                "(the default under sampling), 'holdout_quantile' or 'global_minmax'."
            )
        if streamed:
            return (
                "`ica_weight_mode='sampling'` draws rows through the trainer's sampler, which a streamed "
                "`train_dataset` (an IterableDataset) does not use: pass a Dataset, or use `ica_weight_mode='loss'`."
            )
        if self.ica_refresh == "online":
            return (
                "`ica_weight_mode='sampling'` needs every row's weight before the epoch is drawn, but "
                "`ica_refresh='online'` scores rows only once they are drawn. Use a numeric `ica_refresh` (R "
                "scorings, each redrawing the rest of the epoch), or `ica_weight_mode='loss'`."
            )
        if getattr(self, "packing", False):
            return (
                "`ica_weight_mode='sampling'` draws examples, but with `packing=True` the sampler draws packed "
                "sequences of several examples. Set `packing=False`, or use `ica_weight_mode='loss'`."
            )
        strategy = getattr(self, "train_sampling_strategy", "random")
        if strategy != "random":
            return (
                f"`ica_weight_mode='sampling'` replaces the random sampler, but `train_sampling_strategy` is "
                f"{strategy!r}, which orders the rows its own way. Use 'random', or `ica_weight_mode='loss'`."
            )
        if self.ica_loss_reduction != "token_mean":
            return (
                f"`ica_loss_reduction={self.ica_loss_reduction!r}` divides a weighted loss by its weights, but under "
                "`ica_weight_mode='sampling'` the loss is the stock one (every weight 1). Leave it at 'token_mean'."
            )
        return None

    def _choose_weight_mode(self, kind: str, streamed: bool) -> None:
        """`ica_weight_mode` left unset: the preset's, unless the preset samples and these settings cannot, in which
        case the loss is weighted and `ica_weight_mode_reason` says why (the trainer logs it)."""
        self.ica_weight_mode_reason = None
        if self.ica_weight_mode is not None:
            return
        mode = preset_weight_mode(self.ica_preset, kind)
        conflict = self._sampling_conflict(streamed) if mode == "sampling" else None
        if conflict is not None:
            mode = "loss"
            self.ica_weight_mode_reason = (
                f"`ica_preset={self.ica_preset!r}` draws rows by their weights, but here the trainer weights each "
                f"row's loss instead (`ica_weight_mode='loss'`): {conflict}"
            )
        self.ica_weight_mode = mode

    def _check_weight_mode(self, streamed: bool = False) -> None:
        """`ica_weight_mode="sampling"` draws rows by weights fixed before they are drawn: refuse what cannot give
        those, naming the field and the reason."""
        if self.ica_weight_mode != "sampling":
            return
        conflict = self._sampling_conflict(streamed)
        if conflict is not None:
            raise ValueError(conflict)

    def _check_token_quantile(self, kind: str) -> None:
        """`ica_token_quantile` masks the tokens of single responses, from the scoring of the whole training set."""
        check_token_quantile(self.ica_token_quantile)
        if self.ica_token_quantile is None:
            return
        value = f"`ica_token_quantile`={self.ica_token_quantile!r}"
        if kind == "preference":
            raise ValueError(
                f"{value} masks tokens of an SFT response; preference losses compare whole responses. Leave it unset."
            )
        if self.ica_refresh == "online":
            raise ValueError(
                f"{value} sets its threshold from the holdout's tokens scored with the training set, "
                "which online scoring does not do. Use a numeric `ica_refresh`."
            )
        if self.ica_score_span == AUTO:  # the token masks score every token: so does the row score
            self.ica_score_span = WHOLE
        if self.ica_score_span != WHOLE:
            raise ValueError(
                f"{value} masks every token of a response, but `ica_score_span`={self.ica_score_span!r} scores only "
                f"a span of it. Use one of the two (`ica_score_span={WHOLE!r}` scores the whole response)."
            )
        if self.ica_score_end_token is False:
            raise ValueError(
                f"{value} masks every loss token, the closing token of each response among them, but "
                "`ica_score_end_token=False` leaves that token unscored. Set `ica_score_end_token=True` (the "
                "recommended preset's)."
            )
        if self.ica_scores_file is not None:
            raise ValueError(
                f"{value} needs each response's token log-probs from the scoring, which the scores file "
                f"`ica_scores_file`={self.ica_scores_file!r} does not hold. Let the trainer score, or unset one."
            )

    def choose_precision(self) -> None:
        """bf16 where the device supports it and fp32 elsewhere, when the user left both `bf16` and `fp16` unset.

        TRL turns an unset `bf16` on, and transformers then refuses to start on a machine without a bf16 GPU. Called
        before TRL's `__post_init__`; the test is the one transformers applies (`TrainingArguments.__post_init__`).
        """
        if getattr(self, "bf16", False) is None and not self.fp16:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            self.bf16 = not self.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available())

    def validate_ica(self, kind: str, streamed: bool = False) -> None:
        """Fill the fields left unset from `ica_preset` for `kind` (`"sft"` or `"preference"`), then check and
        normalise the `ica_*` fields; a `ValueError` names the field, the value and what is allowed. Called again by
        a trainer given a streamed training set (`streamed=True`), from the fields the user set."""
        for name in getattr(self, "_ica_preset_filled", ()):
            setattr(self, name, None)
        self._ica_preset_filled = tuple(name for name in PRESET_FIELDS if getattr(self, name) is None)
        self._choose_weight_mode(kind, streamed)
        if self.ica_weighting is None and self.ica_holdout_cutoff != 1.0:
            self.ica_weighting = "holdout_quantile"  # the cutoff is a setting of that weighting alone
        apply_preset(self, kind)
        choices = (
            ("ica_weight_mode", WEIGHT_MODES),
            ("ica_demo_selection", DEMO_SELECTIONS),
            ("ica_weighting", WEIGHTINGS),
            ("ica_reduction", REDUCTIONS),
            ("ica_score_form", FORMS),
            ("ica_demo_layout", DEMO_LAYOUTS),
            ("ica_loss_reduction", LOSS_REDUCTIONS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if self.ica_score_form == "conditioned" and self.ica_reduction == "sum":
            warnings.warn(
                "`ica_score_form='conditioned'` with `ica_reduction='sum'` ranks short responses first (a summed "
                "log-probability falls with every token); `ica_reduction='mean'` is the setting the docs recommend.",
                stacklevel=2,
            )
        if not isinstance(self.ica_num_demos, int) or self.ica_num_demos < 1:
            raise ValueError(f"`ica_num_demos` must be a positive integer, got {self.ica_num_demos!r}.")
        refresh = self.ica_refresh
        if isinstance(refresh, str) and refresh.strip().isdigit():
            refresh = int(refresh)
        if not (refresh == "online" or (isinstance(refresh, int) and not isinstance(refresh, bool) and refresh >= 1)):
            raise ValueError(f"`ica_refresh` must be a positive integer or 'online', got {self.ica_refresh!r}.")
        self.ica_refresh = refresh
        if (self.ica_demo_template is None) != (self.ica_query_template is None):
            raise ValueError("Set both `ica_demo_template` and `ica_query_template`, or neither.")
        self._check_weight_mode(streamed)
        if refresh == "online" and self.ica_weighting in POOL_WEIGHTINGS:
            raise ValueError(
                f"`ica_weighting={self.ica_weighting!r}` compares a row's score with every training row's, which "
                "online scoring does not have (rows are scored as they are drawn): use 'holdout_quantile', or a "
                "numeric `ica_refresh`."
            )
        check_span(self.ica_score_span)
        if self.ica_score_span not in (AUTO, WHOLE) and kind == "preference":
            raise ValueError(
                f"`ica_score_span`={self.ica_score_span!r} scores a span of single responses; preference pairs are "
                "scored by their whole margin. Leave it unset."
            )
        self._check_token_quantile(kind)
        if not isinstance(self.ica_score_end_token, bool):
            raise ValueError(f"`ica_score_end_token` must be True or False, got {self.ica_score_end_token!r}.")
        cutoff = self.ica_holdout_cutoff
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff <= 1:
            raise ValueError(f"`ica_holdout_cutoff` must be a number in (0, 1], got {cutoff!r}.")
        if cutoff != 1 and self.ica_weighting != "holdout_quantile":
            raise ValueError(
                f"`ica_holdout_cutoff`={cutoff!r} applies to `ica_weighting='holdout_quantile'` only, but "
                f"`ica_weighting` is {self.ica_weighting!r}: set the weighting, or leave the cutoff at 1.0."
            )
        steps = self.ica_holdout_rescore_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"`ica_holdout_rescore_steps` must be a positive integer, got {steps!r}.")
        if self.ica_scoring_model is not None:
            check_fixed_scorer(self.ica_scoring_model, refresh)
        if self.ica_scoring_sharing not in SHARINGS:
            raise ValueError(
                f"`ica_scoring_sharing` must be one of {list(SHARINGS)}, got {self.ica_scoring_sharing!r}."
            )
        overhead = self.ica_scoring_overhead
        if isinstance(overhead, str) and overhead != "measure":
            try:
                overhead = self.ica_scoring_overhead = float(overhead)  # from the command line
            except ValueError:
                overhead = -1.0
        if not (
            overhead is None
            or overhead == "measure"
            or (isinstance(overhead, (int, float)) and not isinstance(overhead, bool) and overhead >= 0)
        ):
            raise ValueError(
                f"`ica_scoring_overhead` must be None, a number of tokens >= 0 or 'measure', got "
                f"{self.ica_scoring_overhead!r}."
            )
        for name in ("ica_scoring_batch_size", "ica_scoring_max_tokens", "ica_max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
