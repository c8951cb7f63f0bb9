"""ICA bookkeeping shared by every trainer: when to score, batch weights, logged metrics, files and resume state."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from accelerate import PartialState
from accelerate.utils import gather_object

from ..data_io import written_whole
from ..scoring.distributed import num_processes
from ..scoring.engine import ScoringBudget, score_requests
from ..scoring.ica import ICARequestBuilder, assemble_scores, score_with
from ..scoring.weighting import BATCH_WEIGHTINGS, compute_weights, score_range

logger = logging.getLogger(__name__)

STATE_FILE = "ica_state.npz"
# Preference pairs: the four log-probs behind a score, as written to `refresh-<k>.jsonl`
WEIGHTS_FILE = "weights.jsonl"
# `ica_*` fields that do not change the scores, the demonstrations or the weights a resumed run continues with
#: The `ica_*` fields besides the score's own ([`ICAScoringOptions.record`]) that saved state depends on: how scores
#: become weights and when scoring happens. The others (the scoring budget, where given scores came from, the preset
#: the settings were filled from) change no saved number.
STATE_FIELDS = (
    "ica_weighting", "ica_holdout_cutoff", "ica_holdout_rescore_steps", "ica_temperature", "ica_refresh",
    "ica_max_length",
)  # fmt: skip
NOT_FINGERPRINTED = ("ica_scoring_batch_size", "ica_scoring_max_tokens", "ica_scores_file", "ica_preset")


def _digest(items) -> str:
    import hashlib

    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


PAIR_FIELDS = ("logp_chosen_conditioned", "logp_rejected_conditioned", "logp_chosen", "logp_rejected")


def _number(value) -> float | None:
    """A JSON-safe float: None for NaN (a part the score form did not compute)."""
    return None if np.isnan(value) else float(value)


def _write_lines(path: str, records) -> None:
    """JSON lines, written whole (see [`written_whole`])."""
    with written_whole(path) as temporary, open(temporary, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


class ICAController:
    """Scores, refresh schedule and weights of one training run.

    Weights are computed per optimizer step: the trainer calls [`begin_step`] with every micro-batch of the step
    before the first one runs, and the schemes that compare scores within a batch (`batch_minmax`, `softmax`,
    `rank`) compare all the examples of the step, over gradient accumulation and processes. The same step therefore
    gets the same weights however it is split into micro-batches.

    Args:
        builder ([`ICARequestBuilder`]): requests of the training examples, indexed by their `ica_index`.
        args ([`ICAArguments`]): the validated `ica_*` fields.
        output_dir (`str`): where `ica/` files (scores of each refresh, batch weights, plots) are written.
        is_main_process (`bool`): only the main process writes files and shows progress bars.

    Files under `output_dir/ica/`: `refresh-<k>.jsonl` (every example's score and its parts at refresh k, keyed by
    `ica_index`), `weights.jsonl` (the score and weight of each example each time it was trained on).
    """

    def __init__(
        self,
        builder: ICARequestBuilder,
        args,
        output_dir: str,
        is_main_process: bool = True,
        reference_builder: ICARequestBuilder | None = None,
        on_scored=None,
        compute_dtype=None,
    ):
        self.builder = builder
        # How every scoring of the run calls the engine: the training's compute dtype, and one token budget whose
        # out-of-memory back-off holds for the rest of the run
        self.budget = ScoringBudget(args.ica_scoring_max_tokens)
        self.engine_options = dict(
            batch_size=args.ica_scoring_batch_size, max_batch_tokens=self.budget, compute_dtype=compute_dtype
        )
        # `holdout_quantile`: the requests that score the holdout itself, and its latest scores
        self.reference_builder = reference_builder
        self.reference: np.ndarray | None = None
        self.reference_step: int | None = None
        self.references_done = 0
        self.args = args
        self.dir = os.path.join(output_dir, "ica")
        self.is_main = is_main_process
        n = len(builder.candidates)
        self.scores = np.full(n, np.nan)
        self.refreshes_done = 0
        self.global_range: tuple[float, float] | None = None
        # Online: rows whose training forward scores exactly the unconditioned request (see the trainers)
        self.reuse_unconditioned = np.zeros(n, dtype=bool)
        # The weights of the step under way, by `ica_index` (None until `begin_step`, or while they wait for the
        # step's only micro-batch to read log p(y | x) off its forward)
        self._step_weights: dict[int, float] | None = None
        self.step_begun: int | None = None  # optimizer step `begin_step` was last called for
        self._warned_single = False
        self._warned_schedule = False
        self.last_scored_step: int | None = None  # optimizer step of the latest scoring of the training set
        self.resumed_step: int | None = None  # the checkpoint's step, when the run resumed from one
        # (scores, weights) of the steps since the trainer last logged, for the trackers' histograms
        self.pending_histograms: list[tuple[np.ndarray, np.ndarray]] = []
        self.on_scored = on_scored  # called with the training set's scores after each scoring (R refreshes)

    def set_reusable_rows(self, reuse: np.ndarray) -> None:
        """Online scoring: the rows whose training forward computes exactly their unconditioned request, so that
        their log p(y | x) is read off it (a boolean mask over the training rows)."""
        reuse = np.asarray(reuse, dtype=bool)
        if reuse.shape != self.reuse_unconditioned.shape:
            raise ValueError(f"`reuse` must have one entry per training row, {self.reuse_unconditioned.shape}; "
                             f"got {reuse.shape}.")  # fmt: skip
        self.reuse_unconditioned = reuse

    def take_histograms(self) -> dict[str, np.ndarray]:
        """The scores and weights of the steps trained since the last call (`ica/scores`, `ica/weights`), for the
        trackers' histograms; empty when there were none."""
        pending, self.pending_histograms = self.pending_histograms, []
        if not pending:
            return {}
        scores, weights = (np.concatenate(parts) for parts in zip(*pending))
        return {"ica/scores": scores, "ica/weights": weights}

    @property
    def online(self) -> bool:
        return self.args.ica_refresh == "online"

    def refresh_steps(self, max_steps: int) -> list[int]:
        """The optimizer steps at which the R scorings happen: evenly spread, the first before training. A run of
        fewer than R steps scores once at each of its steps (never twice at one step), with a warning."""
        refresh = self.args.ica_refresh
        steps = sorted({round(k * max_steps / refresh) for k in range(refresh)} - {max(1, max_steps)})
        if len(steps) < refresh and not self._warned_schedule:
            logger.warning(
                "ica_refresh=%d, but training runs %d optimizer step(s): the training set is scored %d time(s), at "
                "steps %s. Lower `ica_refresh` to at most the number of steps to silence this.",
                refresh, max_steps, len(steps), steps,
            )  # fmt: skip
            self._warned_schedule = True
        return steps

    def _score_all(self, model, builder: ICARequestBuilder):
        """Every candidate of `builder` scored with the run's form, reduction and batch size (sharded over
        processes)."""
        return score_with(
            model,
            builder,
            show_progress=self.is_main and not getattr(self.args, "disable_tqdm", False),
            **self.engine_options,
        )

    def use_scores(self, scores, source: str) -> None:
        """Take `scores` (one per training example, by `ica_index`) as the run's one scoring (`ica_refresh=1`)
        instead of scoring before training; written to `ica/refresh-0.jsonl` with their `source`."""
        if self.online or self.args.ica_refresh != 1:
            raise ValueError(
                f"Given scores replace the one scoring before training, so they need `ica_refresh=1`, got "
                f"{self.args.ica_refresh!r}."
            )
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.scores.shape:
            raise ValueError(f"{source}: {scores.size} scores for {self.scores.size} training examples.")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            raise ValueError(f"{source}: the scores of rows {bad[:5].tolist()} are not finite numbers.")
        self.scores, self.global_range, self.refreshes_done = scores, score_range(scores), 1
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            records = [{"ica_index": i, "step": 0, "score": float(v), "source": source} for i, v in enumerate(scores)]
            _write_lines(os.path.join(self.dir, "refresh-0.jsonl"), records)

    def maybe_refresh(self, model, step: int, max_steps: int) -> bool:
        """Score the whole training set if a refresh is due at `step`; returns whether it scored."""
        if not self.online and self.reference_builder is not None and self.reference is None and self.refreshes_done:
            self.score_reference(model, step)  # given scores (`use_scores`): the holdout's own are still needed
        if self.online or self.refreshes_done >= self.args.ica_refresh or step == self.last_scored_step:
            return False
        schedule = self.refresh_steps(max_steps)
        if self.refreshes_done >= len(schedule) or step < schedule[self.refreshes_done]:
            return False
        result = self._score_all(model, self.builder)
        self.last_scored_step = step
        if self.on_scored is not None and self.is_main:
            self.on_scored(result.scores)
        self.scores = result.scores
        self.global_range = score_range(result.scores)
        self.score_reference(model, step)
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            records = []
            for i in range(len(result.scores)):
                record = {
                    "ica_index": i,
                    "step": step,
                    "score": float(result.scores[i]),
                    "logp_conditioned": float(result.logp_conditioned[i]),
                    "logp_unconditioned": _number(result.logp_unconditioned[i]),
                    "num_tokens": int(result.num_tokens[i]),
                    "demo_indices": result.demo_indices[i].tolist(),
                }
                if result.pair_logps is not None:
                    record.update(zip(PAIR_FIELDS, map(_number, result.pair_logps[i])))
                records.append(record)
            _write_lines(os.path.join(self.dir, f"refresh-{self.refreshes_done}.jsonl"), records)
        self.refreshes_done += 1
        return True

    def score_reference(self, model, step: int) -> None:
        """`holdout_quantile`: score every holdout row against the rest of the holdout with the current model (the
        scores clean, on-target examples get), written to `ica/holdout-<k>.jsonl`. Nothing for other schemes."""
        if self.reference_builder is None:
            return
        result = self._score_all(model, self.reference_builder)
        self.reference, self.reference_step = result.scores, step
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            records = [
                {"holdout_index": i, "step": step, "score": float(score), "demo_indices": demos.tolist()}
                for i, (score, demos) in enumerate(zip(result.scores, result.demo_indices))
            ]
            _write_lines(os.path.join(self.dir, f"holdout-{self.references_done}.jsonl"), records)
        self.references_done += 1

    def _reference_due(self, step: int) -> bool:
        return self.reference_builder is not None and (
            self.reference is None or step - self.reference_step >= self.args.ica_holdout_rescore_steps
        )

    def batch_scores(self, model, indices: np.ndarray, unconditioned: np.ndarray | None = None) -> np.ndarray:
        """Scores of the batch's examples: stored ones, or (online) scored now with the current model.

        `unconditioned` holds log p(y | x) read off the training forward, `(B,)` for examples or `(B, 2)` [chosen,
        rejected] for pairs, NaN where it could not be read; those are scored here (for the difference form; the
        conditioned form does not need them).
        """
        if not self.online:
            return self.scores[indices]
        if self._reference_due(self.step_begun or 0):
            self.score_reference(model, self.step_begun or 0)
        width = self.builder.width
        # Each process scores its own batch; "lockstep" keeps the model calls of the processes in step
        cond = score_requests(
            model,
            [r for i in indices for r in self.builder.requests(i, True)],
            show_progress=False,
            distributed="lockstep",
            **self.engine_options,
        )
        shape = (len(indices), width)
        plain = np.full(shape, np.nan) if unconditioned is None else np.array(unconditioned, dtype=np.float64)
        plain = plain.reshape(shape)
        missing = np.argwhere(np.isnan(plain)) if self.builder.options.form == "difference" else np.empty((0, 2), int)
        extra = score_requests(  # every process calls it, with or without work, to stay in step
            model,
            [self.builder.requests(indices[row], False)[col] for row, col in missing],
            show_progress=False,
            distributed="lockstep",
            **self.engine_options,
        )
        if len(missing):
            plain[tuple(missing.T)] = extra.sums
        result = assemble_scores(
            cond.sums.reshape(shape),
            plain,
            cond.counts.reshape(shape),
            self.builder.demo_indices[indices],
            self.builder.options.reduction,
            self.builder.options.form,
            rows=indices,
        )
        scores = result.scores
        self.scores[indices] = scores
        low, high = score_range(scores)
        if num_processes() > 1:  # every process keeps the range of all the batches scored so far
            ranges = gather_object([(low, high)])
            low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        self.global_range = (
            (low, high)
            if self.global_range is None
            else (min(low, self.global_range[0]), max(high, self.global_range[1]))
        )
        return scores

    def ready_demonstrations(self) -> None:
        """Choose the demonstrations now if the builders deferred them ([`ICARequestBuilder.defer`]); every process
        calls it at the same point (the model's own embeddings run on all of them)."""
        for builder in (self.builder, self.reference_builder):
            if builder is not None:
                builder.demo_indices  # noqa: B018 - the first access chooses them

    def begin_step(self, model, micro_batches: list[np.ndarray], step: int, max_steps: int) -> dict[str, float] | None:
        """Weights of one optimizer step, from the `ica_index` of each of this process's micro-batches of the step.

        Every process calls it once per step, before the step's first micro-batch. Refreshes due at `step` happen
        here. Online, the whole step is scored at once with the current model (demonstration prefixes shared across
        the step's micro-batches), except when the step is a single micro-batch whose forward yields log p(y | x):
        then its weights are computed in that forward ([`micro_batch_weights`]), saving the pass without
        demonstrations. Returns the step's `ica/*` metrics, or None when they come with the micro-batch.
        """
        self.step_begun = step
        self._step_weights = None
        self.ready_demonstrations()
        self.maybe_refresh(model, step, max_steps)
        if not micro_batches:
            return None
        defer = (
            self.online
            and len(micro_batches) == 1
            and self.builder.options.form == "difference"
            and bool(self.reuse_unconditioned.any())
        )
        if defer:
            return None
        indices = np.concatenate([np.asarray(m, dtype=np.int64).reshape(-1) for m in micro_batches])
        weights, metrics = self.weights(self.batch_scores(model, indices), indices, step)
        self._step_weights = dict(zip(indices.tolist(), weights.tolist()))
        return metrics

    def micro_batch_weights(
        self, model, indices: np.ndarray, step: int, unconditioned: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, float] | None]:
        """Weights of one micro-batch: looked up in the step's weights, or computed now when the step's weights wait
        for this forward's log p(y | x) (`unconditioned`, see [`batch_scores`]) or no step was begun (a
        `compute_loss` called outside the training loop, where the micro-batch is the step). The metrics are None
        when they were returned by [`begin_step`]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        table = self._step_weights
        if table is not None and all(i in table for i in indices.tolist()):
            return np.array([table[i] for i in indices.tolist()], dtype=np.float64), None
        return self.weights(self.batch_scores(model, indices, unconditioned), indices, step)

    def weights(self, scores: np.ndarray, indices: np.ndarray, step: int) -> tuple[np.ndarray, dict[str, float]]:
        """Weights of this process's batch and the `ica/*` metrics of the step, recorded in `weights.jsonl`.

        With several processes the batch is the global one: every process's scores are gathered, the weights are
        computed over all of them (for the schemes that compare a batch's scores), and this process keeps its own.
        """
        scores, indices = np.asarray(scores, dtype=np.float64), np.asarray(indices)
        all_scores, all_indices, mine = scores, indices, slice(None)
        if num_processes() > 1:
            parts = gather_object([(indices, scores)])
            rank = PartialState().process_index
            start = sum(len(p[0]) for p in parts[:rank])
            mine = slice(start, start + len(indices))
            all_indices = np.concatenate([p[0] for p in parts])
            all_scores = np.concatenate([p[1] for p in parts])
        scheme = self.args.ica_weighting
        if scheme in BATCH_WEIGHTINGS and len(all_scores) == 1:
            # One example alone has no batch to be compared with: weight it against every score so far instead.
            if not self._warned_single:
                logger.warning(
                    "ICA: step %d trains on a single example, which `ica_weighting=%r` would weight 1 whatever its "
                    "score; it is weighted against the range of all the scores so far (as 'global_minmax'). This "
                    "happens at the last step of an epoch that does not divide into full steps.",
                    step,
                    scheme,
                )
                self._warned_single = True
            scheme = "global_minmax" if self.global_range is not None else "none"
        weights = compute_weights(
            all_scores,
            scheme,
            temperature=self.args.ica_temperature,
            global_range=self.global_range,
            reference=self.reference,
            cutoff=self.args.ica_holdout_cutoff,
            where=f"training examples (ica_index) {all_indices.tolist()}, rows",
        )
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            lines = "".join(
                json.dumps({"step": step, "ica_index": int(i), "score": float(s), "weight": float(w)}) + "\n"
                for i, s, w in zip(all_indices, all_scores, weights)
            )
            with open(os.path.join(self.dir, WEIGHTS_FILE), "a") as f:
                f.write(lines)  # a step's rows in one write: an interrupted run loses whole steps only
            self.pending_histograms.append((all_scores, weights))
        metrics = self.metrics(all_scores, weights)
        if self.reference is not None:
            metrics["ica/holdout_score_median"] = float(np.median(self.reference))
        return weights[mine], metrics

    @staticmethod
    def metrics(scores: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        return {
            "ica/score_mean": float(np.mean(scores)),
            "ica/score_std": float(np.std(scores)),
            "ica/weight_mean": float(np.mean(weights)),
            "ica/weight_min": float(np.min(weights)),
            "ica/weight_max": float(np.max(weights)),
        }

    # Files and resume
    def fingerprint(self) -> dict:
        """What the saved state depends on: the training rows, the holdout, the score's options and the
        [`STATE_FIELDS`]."""
        settings = {**self.builder.options.comparable(), **{name: getattr(self.args, name) for name in STATE_FIELDS}}
        return {
            "training rows": _digest(self.builder.candidates),
            "holdout rows": _digest(self.builder.holdout),
            **{name: repr(value) for name, value in sorted(settings.items())},
        }

    def start_files(self) -> None:
        """At the start of `train()`: a new run starts `ica/` afresh (its weights log, and any scoring file a
        previous run in this `output_dir` left beyond the ones this run has made); a resumed run keeps what its
        checkpoint covers and drops the weights logged after the checkpoint's step."""
        if not self.is_main or not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            stem, _, k = os.path.splitext(name)[0].partition("-")
            done = {"refresh": self.refreshes_done, "holdout": self.references_done}.get(stem)
            if done is not None and k.isdigit() and int(k) >= done:
                os.remove(os.path.join(self.dir, name))
        path = os.path.join(self.dir, WEIGHTS_FILE)
        if not os.path.isfile(path):
            return
        if self.resumed_step is None:
            os.remove(path)
            return
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] < self.resumed_step]
        with written_whole(path) as temporary, open(temporary, "w") as f:
            f.writelines(kept)

    def save(self, folder: str, step: int) -> None:
        low, high = self.global_range if self.global_range is not None else (np.nan, np.nan)
        with written_whole(os.path.join(folder, STATE_FILE)) as temporary:
            np.savez(
                temporary,
                fingerprint=np.array(json.dumps(self.fingerprint())),
                step=step,
                scores=self.scores,
                refreshes_done=self.refreshes_done,
                global_range=np.array([low, high]),
                demo_indices=self.builder.demo_indices,
                reference=self.reference if self.reference is not None else np.zeros(0),
                reference_step=-1 if self.reference_step is None else self.reference_step,
                references_done=self.references_done,
            )

    def load(self, folder: str) -> None:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming from {folder!r}, which has no {STATE_FILE}: it was not saved by an ICA trainer, so the "
                "ICA scores cannot be restored."
            )
        state = np.load(path)
        if "fingerprint" not in state:
            raise ValueError(
                f"{path} was saved by an older trl_ica without a record of its data and settings, so resuming cannot "
                "check that they are this run's; start the run afresh."
            )
        saved, now = json.loads(str(state["fingerprint"])), self.fingerprint()
        changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if changed:
            details = ", ".join(
                k if k.endswith("rows") else f"{k}: checkpoint {saved.get(k)}, now {now.get(k)}" for k in changed
            )
            raise ValueError(
                f"Cannot resume from {folder!r}: its ICA state was computed for other data or settings ({details}). "
                "Resume with the training set, holdout and `ica_*` settings of that run, or start afresh in another "
                "`output_dir`."
            )
        self.resumed_step = int(state["step"])
        self.scores = state["scores"]
        self.refreshes_done = int(state["refreshes_done"])
        low, high = state["global_range"]
        self.global_range = None if np.isnan(low) else (float(low), float(high))
        self.builder.demo_indices = state["demo_indices"]
        if self.reference_builder is not None and "reference" in state and state["reference"].size:
            self.reference = state["reference"]
            self.reference_step = int(state["reference_step"])
            self.references_done = int(state["references_done"])
        logger.info("Restored ICA state from %s (%d scoring(s) done).", folder, self.refreshes_done)
