"""What a run shows of its scores and weights: the `ica/` files, the `ica/*` metrics and the trackers' histograms."""

from __future__ import annotations

import json
import os

import numpy as np

from ..data_io import written_whole

WEIGHTS_FILE = "weights.jsonl"
# Preference pairs: the four log-probs behind a score, as written to `refresh-<k>.jsonl`
PAIR_FIELDS = ("logp_chosen_conditioned", "logp_rejected_conditioned", "logp_chosen", "logp_rejected")


def _number(value) -> float | None:
    """A JSON-safe float: None for NaN (a part the score form did not compute)."""
    return None if np.isnan(value) else float(value)


def _write_lines(path: str, records) -> None:
    """JSON lines, written whole (see [`written_whole`])."""
    with written_whole(path) as temporary, open(temporary, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def step_metrics(scores: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    return {
        "ica/score_mean": float(np.mean(scores)),
        "ica/score_std": float(np.std(scores)),
        "ica/weight_mean": float(np.mean(weights)),
        "ica/weight_min": float(np.min(weights)),
        "ica/weight_max": float(np.max(weights)),
    }


class RunRecorder:
    """Files under `output_dir/ica/` (main process only) and what the trainer logs.

    Files: `refresh-<k>.jsonl` (every example's score and its parts at scoring k, keyed by `ica_index`),
    `holdout-<k>.jsonl` (the holdout's own scores, `holdout_quantile`), `weights.jsonl` (the score and weight of each
    example each time it was trained on).

    The trainer drains, after each call into the controller, [`take_metrics`] (the step's `ica/*` scalars) and
    [`take_scoring_histograms`] (`ica/scores_all` at each scoring); [`take_step_histograms`] (`ica/scores`,
    `ica/weights` of the steps since) when it logs.

    With a scoring model of its own (`scored_by`, its name), every scoring record names it as `scoring_model`.
    """

    def __init__(self, output_dir: str, is_main_process: bool = True, scored_by: str | None = None):
        self.dir = os.path.join(output_dir, "ica")
        self.is_main = is_main_process
        self.scored_by = {} if scored_by is None else {"scoring_model": scored_by}
        self._metrics: list[dict[str, float]] = []
        self._step_histograms: list[tuple[np.ndarray, np.ndarray]] = []
        self._scoring_histograms: list[dict[str, np.ndarray]] = []

    def _path(self, name: str) -> str:
        os.makedirs(self.dir, exist_ok=True)
        return os.path.join(self.dir, name)

    def scoring(self, k: int, step: int, result) -> None:
        """Scoring `k` of the training set ([`ICAScores`] `result`) at `step`: `refresh-<k>.jsonl`, a histogram."""
        if not self.is_main:
            return
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
                **self.scored_by,
            }
            if result.pair_logps is not None:
                record.update(zip(PAIR_FIELDS, map(_number, result.pair_logps[i])))
            records.append(record)
        _write_lines(self._path(f"refresh-{k}.jsonl"), records)
        self._scoring_histograms.append({"ica/scores_all": np.asarray(result.scores)})

    def given_scores(self, scores: np.ndarray, source: str) -> None:
        """Scores given to the run instead of its first scoring: `refresh-0.jsonl`, with where they came from."""
        if self.is_main:
            records = [{"ica_index": i, "step": 0, "score": float(v), "source": source} for i, v in enumerate(scores)]
            _write_lines(self._path("refresh-0.jsonl"), records)

    def holdout_scoring(self, k: int, step: int, result) -> None:
        """Scoring `k` of the holdout against itself (`holdout_quantile`): `holdout-<k>.jsonl`."""
        if self.is_main:
            records = [
                {
                    "holdout_index": i,
                    "step": step,
                    "score": float(score),
                    "demo_indices": demos.tolist(),
                    **self.scored_by,
                }
                for i, (score, demos) in enumerate(zip(result.scores, result.demo_indices))
            ]
            _write_lines(self._path(f"holdout-{k}.jsonl"), records)

    def step(self, step: int, indices, scores, weights, reference=None, loss_scale: float | None = None) -> None:
        """The weights of one optimizer step (every process's examples): a line per example in `weights.jsonl`,
        the step's metrics and its share of the next histograms. `loss_scale` (`ica_loss_reduction="weighted_mean"`) is
        logged as `ica/loss_scale`; the weights written are the scheme's, before it."""
        metrics = step_metrics(scores, weights)
        if reference is not None:
            metrics["ica/holdout_score_median"] = float(np.median(reference))
        if loss_scale is not None:
            metrics["ica/loss_scale"] = loss_scale
        self._metrics.append(metrics)
        if not self.is_main:
            return
        lines = "".join(
            json.dumps({"step": step, "ica_index": int(i), "score": float(s), "weight": float(w)}) + "\n"
            for i, s, w in zip(indices, scores, weights)
        )
        with open(self._path(WEIGHTS_FILE), "a") as f:
            f.write(lines)  # a step's rows in one write: an interrupted run loses whole steps only
        self._step_histograms.append((scores, weights))

    def take_metrics(self) -> list[dict[str, float]]:
        taken, self._metrics = self._metrics, []
        return taken

    def take_scoring_histograms(self) -> list[dict[str, np.ndarray]]:
        taken, self._scoring_histograms = self._scoring_histograms, []
        return taken

    def take_step_histograms(self) -> dict[str, np.ndarray]:
        """The scores and weights of the steps trained since the last call (`ica/scores`, `ica/weights`); empty
        when there were none."""
        pending, self._step_histograms = self._step_histograms, []
        if not pending:
            return {}
        scores, weights = (np.concatenate(parts) for parts in zip(*pending))
        return {"ica/scores": scores, "ica/weights": weights}

    def start(self, refreshes_done: int, references_done: int, resumed_step: int | None) -> None:
        """At the start of `train()`: a new run starts `ica/` afresh (its weights log, and any scoring file a
        previous run in this `output_dir` left beyond the ones this run has made); a resumed run keeps what its
        checkpoint covers and drops the weights logged after the checkpoint's step."""
        if not self.is_main or not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            stem, _, k = os.path.splitext(name)[0].partition("-")
            done = {"refresh": refreshes_done, "holdout": references_done}.get(stem)
            if done is not None and k.isdigit() and int(k) >= done:
                os.remove(os.path.join(self.dir, name))
        path = os.path.join(self.dir, WEIGHTS_FILE)
        if not os.path.isfile(path):
            return
        if resumed_step is None:
            os.remove(path)
            return
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] < resumed_step]
        with written_whole(path) as temporary, open(temporary, "w") as f:
            f.writelines(kept)
