"""When a run scores, and the one path from its scores to the weights of each optimizer step."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from accelerate.utils import gather_object

from ..scoring.distributed import num_processes
from ..scoring.engine import ScoringBudget
from ..scoring.ica import ICARequestBuilder, score_with
from ..scoring.scorer import ScoringModel, release
from ..scoring.streamed import StreamedRequestBuilder
from ..scoring.weighting import score_range, token_keep, token_threshold
from .recorder import RunRecorder
from .state import ICAState, fingerprint
from .weigher import StepWeigher, loss_scale

if TYPE_CHECKING:
    from .ica_args import ICATrainingOptions

logger = logging.getLogger(__name__)


class ICAController:
    """Scores, refresh schedule and weights of one training run.

    It owns three parts, each with one job: [`ICAState`] (`state`: the numbers computed so far and their
    checkpoint), [`StepWeigher`] (`weigher`: a step's scores -> its weights, over processes) and [`RunRecorder`]
    (`recorder`: the `ica/` files, metrics and histograms). The controller decides when to score.

    Weights are computed per optimizer step: the trainer calls [`begin_step`] with every micro-batch of the step
    before the first one runs, and that is the one place a refresh is triggered. The schemes that compare scores
    within a batch (`batch_minmax`) compare all the examples of the step, over gradient
    accumulation and processes, so the same step gets the same weights however it is split into micro-batches. Each
    micro-batch then reads its weights with [`micro_batch_weights`].

    Online, [`begin_step`] scores the whole step with the current model, in eval mode and without gradients, before
    its first forward: log p(y | D, x), and log p(y | x) for the difference form. Nothing is read off the training
    forward, whose train-mode noise (dropout, NEFTune's embedding noise, router jitter) the scores must not carry.

    Args:
        builder ([`ICARequestBuilder`]): requests of the training examples, indexed by their `ica_index`.
        training ([`ICATrainingOptions`]): how scores become training (weighting, refresh, budget, ...).
        output_dir (`str`): where the `ica/` files are written.
        is_main_process (`bool`): only the main process writes files and shows progress bars.
        reference_builder ([`ICARequestBuilder`], *optional*): `holdout_quantile`: the holdout scored against itself.
        compute_dtype (`torch.dtype`, *optional*): the dtype scoring computes in (the training's).
        scorer ([`ScoringModel`], *optional*): a fixed model that scores instead of the trained one. It scores the
            training set once (R = 1) and is then freed, or online each step's rows, and the holdout once.
    """

    def __init__(
        self,
        builder: ICARequestBuilder,
        training: ICATrainingOptions,
        output_dir: str,
        is_main_process: bool = True,
        reference_builder: ICARequestBuilder | None = None,
        compute_dtype=None,
        scorer: ScoringModel | None = None,
    ):
        self.builder = builder
        self.scorer = scorer
        self.scorer_name = None if scorer is None else scorer.name
        self.reference_builder = reference_builder
        self.training = training
        self.is_main = is_main_process
        self.state = ICAState.empty(len(builder.candidates))
        self.weigher = StepWeigher(training.weighting, training.holdout_cutoff)
        self.recorder = RunRecorder(output_dir, is_main_process, self.scorer_name)
        # How every scoring of the run calls the engine: the training's compute dtype, and one token budget whose
        # out-of-memory back-off holds for the rest of the run
        self.budget = ScoringBudget(training.scoring_max_tokens)
        self.engine_options = dict(
            batch_size=training.scoring_batch_size,
            max_batch_tokens=self.budget,
            compute_dtype=compute_dtype,
            sharing=training.scoring_sharing,
            forward_overhead=training.scoring_overhead,
        )
        # `ica_weight_mode="sampling"`: the weights pick the rows drawn ([`pool_weights`]); the loss is the stock one
        self.sampling = training.weight_mode == "sampling"
        # `ica_token_quantile`: scorings keep each response's token log-probs, and tokens under the holdout's
        # quantile leave the loss ([`token_masks`])
        self.token_quantile = training.token_quantile
        self._threshold: tuple[int, float] | None = None  # (references_done, threshold)
        self.step_begun: int | None = None  # the optimizer step `begin_step` was last called for
        self._step_members: set[int] = set()  # its examples on this process
        self._step_weights: dict[int, float] | None = None  # their weights
        self._step_units: dict[int, float] = {}  # their loss units (tokens, or 1 per pair)
        self._step_of_one_micro_batch = False  # begun by `micro_batch_weights`, outside the training loop
        self._warned_schedule = False

    @property
    def online(self) -> bool:
        return self.training.online

    # When to score
    def refresh_steps(self, max_steps: int) -> list[int]:
        """The optimizer steps at which the R scorings happen: evenly spread, the first before training. A run of
        fewer than R steps scores once at each of its steps (never twice at one step), with a warning."""
        refresh = self.training.refresh
        steps = sorted({round(k * max_steps / refresh) for k in range(refresh)} - {max(1, max_steps)})
        if len(steps) < refresh and not self._warned_schedule:
            logger.warning(
                "ica_refresh=%d, but training runs %d optimizer step(s): the training set is scored %d time(s), at "
                "steps %s. Lower `ica_refresh` to at most the number of steps to silence this.",
                refresh,
                max_steps,
                len(steps),
                steps,
            )
            self._warned_schedule = True
        return steps

    def ready_demonstrations(self) -> None:
        """Choose the demonstrations now if the builders deferred them ([`ICARequestBuilder.defer`]); every process
        calls it at the same point (the model's own embeddings run on all of them)."""
        for builder in (self.builder, self.reference_builder):
            if builder is not None:
                builder.choose_demonstrations()

    def _scoring(self, model):
        """The model that scores: the run's scoring model, else the trained `model`."""
        if self.scorer is not None:
            return self.scorer.model
        if self.scorer_name is not None:  # freed: the trained model must never stand in for it
            raise RuntimeError(
                f"The scoring model {self.scorer_name} was freed after its one scoring; nothing should score again."
            )
        return model

    def _release_scorer_if_done(self) -> None:
        """Free the scoring model once every score it will ever give exists: the training set's (R = 1, or given)
        and the holdout's own (`holdout_quantile`). Online it stays: rows are scored as they arrive."""
        state = self.state
        if self.scorer is None or self.online or not state.refreshes_done:
            return
        if self.reference_builder is not None and state.reference is None:
            return
        release(self.scorer)
        self.scorer = None

    def _score_all(self, model, builder: ICARequestBuilder):
        """Every candidate of `builder` scored with the run's score options and budget (sharded over processes),
        with their token log-probs under `ica_token_quantile`."""
        return score_with(
            self._scoring(model),
            builder,
            show_progress=self.is_main and self.training.show_progress,
            per_token=self.token_quantile is not None,
            **self.engine_options,
        )

    def use_scores(self, scores, source: str) -> None:
        """Take `scores` (one per training example, by `ica_index`) as the run's one scoring (`ica_refresh=1`)
        instead of scoring before training; written to `ica/refresh-0.jsonl` with their `source`."""
        if self.online or self.training.refresh != 1:
            raise ValueError(
                f"Given scores replace the one scoring before training, so they need `ica_refresh=1`, got "
                f"{self.training.refresh!r}."
            )
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.state.scores.shape:
            raise ValueError(f"{source}: {scores.size} scores for {self.state.scores.size} training examples.")
        # -inf is a score (a response without the span `ica_score_span` scores); NaN is a broken one
        bad = np.flatnonzero(np.isnan(scores) | (scores == np.inf))
        if bad.size:
            raise ValueError(
                f"{source}: the scores of rows {bad[:5].tolist()} are NaN or +inf; scores are numbers, "
                "or -inf for a response without the scored span."
            )
        self.state.scores, self.state.global_range, self.state.refreshes_done = scores, score_range(scores), 1
        self.recorder.given_scores(scores, source)

    def _refresh_if_due(self, model, step: int, max_steps: int) -> None:
        """Score the whole training set (and the holdout, for `holdout_quantile`) if a refresh is due at `step`."""
        state = self.state
        if not self.online and self.reference_builder is not None and state.reference is None and state.refreshes_done:
            self._score_reference(model, step)  # given scores (`use_scores`): the holdout's own are still needed
        if self.online or state.refreshes_done >= self.training.refresh or step == state.last_scored_step:
            return
        schedule = self.refresh_steps(max_steps)
        if state.refreshes_done >= len(schedule) or step < schedule[state.refreshes_done]:
            return
        result = self._score_all(model, self.builder)
        state.scores, state.global_range, state.last_scored_step = result.scores, score_range(result.scores), step
        state.tokens = result.token_logps
        self._score_reference(model, step)
        self.recorder.scoring(state.refreshes_done, step, result)
        state.refreshes_done += 1

    def _score_reference(self, model, step: int) -> None:
        """`holdout_quantile`: score every holdout row against the rest of the holdout with the current model (the
        scores clean, on-target examples get). Nothing for other schemes."""
        if self.reference_builder is None:
            return
        result = self._score_all(model, self.reference_builder)
        self.state.reference, self.state.reference_step = result.scores, step
        self.state.reference_tokens = result.token_logps
        self.recorder.holdout_scoring(self.state.references_done, step, result)
        self.state.references_done += 1

    def _reference_due(self, step: int) -> bool:
        """Whether the holdout's own scores are to be (re)computed at `step`: once with a fixed scoring model."""
        state = self.state
        if self.reference_builder is None:
            return False
        if state.reference is None:
            return True
        return self.scorer_name is None and step - state.reference_step >= self.training.holdout_rescore_steps

    def batch_scores(self, model, indices: np.ndarray) -> np.ndarray:
        """Scores of the batch's examples: stored ones, or (online) scored now with the current model."""
        if not self.online:
            return self.state.scores[indices]
        step = self.step_begun or 0
        if self._reference_due(step):
            self._score_reference(model, step)
        # Each process scores its own batch; "lockstep" keeps the model calls of the processes in step
        result = score_with(
            self._scoring(model),
            self.builder,
            indices,
            show_progress=False,
            distributed="lockstep",
            **self.engine_options,
        )
        scores = result.scores
        self.state.grow(int(indices.max()) + 1 if len(indices) else 0)
        self.state.scores[indices] = scores
        low, high = score_range(scores) if len(scores) else (np.inf, -np.inf)  # nothing scored: no range
        if num_processes() > 1:  # every process keeps the range of all the batches scored so far
            ranges = gather_object([(low, high)])
            low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        if low <= high:
            self.state.widen_range(low, high)
        return scores

    # Token masks
    def token_threshold(self) -> float | None:
        """`ica_token_quantile`: the token log-prob under which a training token leaves the loss, from the
        holdout's latest own scoring; None without token masks or before that scoring."""
        state = self.state
        if self.token_quantile is None or state.reference_tokens is None:
            return None
        if self._threshold is None or self._threshold[0] != state.references_done:
            self._threshold = (state.references_done, token_threshold(state.reference_tokens, self.token_quantile))
        return self._threshold[1]

    def token_masks(self, indices) -> list[np.ndarray] | None:
        """`ica_token_quantile`: for each example of `indices`, which of its scored response tokens stay in the loss
        (those the model with demonstrations finds at least as likely as the threshold); None without token
        masks."""
        threshold = self.token_threshold()
        if threshold is None:
            return None
        if self.state.tokens is None:
            raise RuntimeError("Token masks were asked for before the training set's tokens were scored.")
        return token_keep([self.state.tokens[i] for i in np.asarray(indices).reshape(-1).tolist()], threshold)

    # Sampling
    def pool_weights(self) -> tuple[np.ndarray, tuple[int, int]]:
        """`ica_weight_mode="sampling"`: the weight of every training example (by `ica_index`) under the run's
        weighting, from the current scores, and a version that changes with every scoring of the training set or
        the holdout (the sampler redraws when it does)."""
        state = self.state
        if not state.refreshes_done:
            raise RuntimeError("The sampling weights were asked for before the training set was scored.")
        return self.weigher.pool(state), self.weights_version()

    def weights_version(self) -> tuple[int, int]:
        """What the pool's weights depend on, counted: the scorings of the training set and of the holdout."""
        return self.state.refreshes_done, self.state.references_done

    def before_sampled_step(self, model, step: int, max_steps: int) -> None:
        """`ica_weight_mode="sampling"`: called by the sampler before it draws the rows of optimizer step `step`, on
        every process at the same draw: a scoring due at `step` happens here, so that the step's rows are drawn
        from its weights (the first scoring, at step 0, before any row is drawn)."""
        self.ready_demonstrations()
        self._refresh_if_due(model, step, max_steps)
        self._release_scorer_if_done()

    # Weights
    @property
    def streamed(self) -> bool:
        """Whether the training rows stream in (an IterableDataset): their requests are built as they arrive."""
        return isinstance(self.builder, StreamedRequestBuilder)

    def begin_step(
        self, model, micro_batches: list[np.ndarray], step: int, max_steps: int, units=None, rows=None
    ) -> None:
        """Start optimizer step `step` with the `ica_index` of each of this process's micro-batches of the step, and
        (`units`, the same shape) each example's loss units: its loss tokens, or 1 per pair (the default). A streamed
        training set also gives each micro-batch's `rows` (the rows ICA scores, as mappings).

        Every process calls it once per step, before the step's first micro-batch. A refresh due at `step` happens
        here, and then the step's weights are computed at once (online: the whole step is scored with the current
        model, demonstration prefixes shared across its micro-batches).
        """
        indices = np.concatenate([np.asarray(m, dtype=np.int64).reshape(-1) for m in micro_batches] or [[]])
        units = np.ones(len(indices)) if units is None else np.concatenate([np.reshape(u, -1) for u in units] or [[]])
        self._step_units = dict(zip(indices.tolist(), units.tolist()))
        if self.streamed:
            if rows is None and len(indices):
                raise ValueError("A streamed training set's step needs its rows (`rows`) to score them.")
            # a process whose stream has run out still takes part: its kNN embeddings are kept in step
            self.builder.add(indices.tolist(), [r for part in rows or () for r in part])
        self.step_begun, self._step_members, self._step_weights = step, set(indices.tolist()), None
        self._step_of_one_micro_batch = False
        self.ready_demonstrations()
        self._refresh_if_due(model, step, max_steps)
        self._release_scorer_if_done()
        if len(indices) or num_processes() > 1:  # the others' scoring and weighing are collective
            self._weigh_step(model, indices.astype(np.int64), step)

    def micro_batch_weights(self, model, indices, step: int, max_steps: int, units=None, rows=None) -> np.ndarray:
        """This process's weights of one micro-batch of the step begun by [`begin_step`], as the loss multiplies
        them (the scheme's weights times the step's [`loss_scale`]). A micro-batch of no begun step (a
        `compute_loss` called outside the training loop) is a step of its own, with its `units`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        begun = step == self.step_begun and set(indices.tolist()) <= self._step_members
        if self._step_of_one_micro_batch or not begun:
            self.begin_step(
                model, [indices], step, max_steps, None if units is None else [units], None if rows is None else [rows]
            )
            self._step_of_one_micro_batch = True
        return np.array([self._step_weights[i] for i in indices.tolist()], dtype=np.float64)

    def _weigh_step(self, model, indices: np.ndarray, step: int) -> None:
        """The one path from scores to weights: the step's scores, weighted over every process's examples, recorded."""
        scores = self.batch_scores(model, indices)
        units = [self._step_units.get(i, 1.0) for i in indices.tolist()]
        result = self.weigher(scores, indices, step, self.state, units)
        if not len(result.indices):  # no process had an example: the end of a stream
            self._step_weights = {}
            return
        scale = loss_scale(result.weights, result.units, self.training.loss_reduction)
        logged_scale = scale if self.training.loss_reduction == "weighted_mean" else None
        # the weights written are the scheme's: under sampling, how likely each row was to be drawn
        self.recorder.step(step, result.indices, result.scores, result.weights, self.state.reference, logged_scale)
        loss_weights = np.ones(len(indices)) if self.sampling else result.weights[result.mine] * scale
        self._step_weights = dict(zip(indices.tolist(), loss_weights.tolist()))

    # Checkpoints
    def fingerprint(self) -> dict[str, str]:
        return fingerprint(self.builder, self.training, self.scorer_name)

    def save(self, folder: str, step: int) -> None:
        self.state.save(folder, step, self.builder.demo_indices, self.fingerprint())

    def resume(self, folder: str) -> None:
        """Continue from the state saved in checkpoint `folder`: its scores, and the demonstrations they used."""
        if self.streamed:
            raise ValueError(
                f"Cannot resume ICA from {folder!r} on a streamed training set (an IterableDataset): its rows are "
                "scored as they arrive, so the checkpoint cannot be checked against them. Start the run afresh."
            )
        self.state, demo_indices = ICAState.load(folder, self.fingerprint(), self.reference_builder is not None)
        self.builder.demo_indices = demo_indices

    def start_files(self) -> None:
        self.recorder.start(self.state.refreshes_done, self.state.references_done, self.state.resumed_step)
