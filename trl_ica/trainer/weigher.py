"""The weights of one optimizer step: every process's scores gathered, then weighted together."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from accelerate import PartialState
from accelerate.utils import gather_object

from ..scoring.distributed import num_processes
from ..scoring.weighting import BATCH_WEIGHTINGS, POOL_WEIGHTINGS, compute_weights

logger = logging.getLogger(__name__)


class StepWeights(NamedTuple):
    """The weights of one optimizer step, over every process's examples."""

    indices: np.ndarray  # `ica_index` of each example, process by process
    scores: np.ndarray
    units: np.ndarray  # loss units: an example's loss tokens, or 1 per pair
    weights: np.ndarray
    mine: slice  # this process's examples


def loss_scale(weights: np.ndarray, units: np.ndarray, reduction: str) -> float:
    """The factor a step's weights are multiplied by in the loss (`ica_loss_reduction`): 1 under `"token_mean"`;
    under `"weighted_mean"`, `sum_i n_i / sum_i w_i * n_i` over the step's examples, which turns the trainer's
    `sum_i w_i * nll_i / sum_i n_i` into `sum_i w_i * nll_i / sum_i w_i * n_i`. Exactly 1 when every weight is 1
    (the same integers summed); 1 when every weight is 0 (the loss is 0 either way)."""
    if reduction == "token_mean":
        return 1.0
    weighted = float(np.dot(weights, units))
    return float(np.sum(units)) / weighted if weighted > 0 else 1.0


class StepWeigher:
    """Scores -> weights for the examples of one optimizer step, by the run's `ica_weighting`.

    With several processes the step is the global one: every process's scores are gathered and weighted together
    (the schemes that compare a batch's scores compare all of them), and each process keeps its own weights.

    Args:
        scheme (`str`): `ica_weighting`.
        cutoff (`float`, *optional*, defaults to `1.0`): `ica_holdout_cutoff`.
    """

    def __init__(self, scheme: str, cutoff: float = 1.0):
        self.scheme = scheme
        self.cutoff = cutoff
        self._warned_single = False

    def pool(self, state) -> np.ndarray:
        """The weight of every training example at once (`ica_weight_mode="sampling"`): the schemes that weigh a
        score against the holdout or the whole training set give each row the weight it would get in any batch."""
        if self.scheme in BATCH_WEIGHTINGS:
            raise ValueError(
                f"`ica_weighting={self.scheme!r}` weighs the rows of a batch; it gives no weight to a row on its own."
            )
        return compute_weights(
            state.scores,
            self.scheme,
            global_range=state.global_range,
            reference=state.reference,
            cutoff=self.cutoff,
            pool=state.scores,
            where="training examples (ica_index)",
        )

    def __call__(self, scores, indices, step: int, state, units=None) -> StepWeights:
        """The weights of this process's examples `indices` and every other process's. `state` ([`ICAState`])
        gives the score range (`global_minmax`) and the holdout's scores (`holdout_quantile`); `units` are the
        examples' loss units (default 1 each), gathered with them for [`loss_scale`]."""
        scores, indices = np.asarray(scores, dtype=np.float64), np.asarray(indices)
        units = np.ones(len(indices)) if units is None else np.asarray(units, dtype=np.float64)
        all_scores, all_indices, all_units, mine = scores, indices, units, slice(None)
        if num_processes() > 1:
            parts = gather_object([(indices, scores, units)])
            start = sum(len(p[0]) for p in parts[: PartialState().process_index])
            mine = slice(start, start + len(indices))
            all_indices, all_scores, all_units = (np.concatenate([p[k] for p in parts]) for k in range(3))
        scheme = self.scheme
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
            scheme = "global_minmax" if state.global_range is not None else "none"
        weights = compute_weights(
            all_scores,
            scheme,
            global_range=state.global_range,
            reference=state.reference,
            cutoff=self.cutoff,
            pool=state.scores if scheme in POOL_WEIGHTINGS else None,
            where=f"training examples (ica_index) {all_indices.tolist()}, rows",
        )
        return StepWeights(all_indices, all_scores, all_units, weights, mine)
