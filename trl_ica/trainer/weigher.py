"""The weights of one optimizer step: every process's scores gathered, then weighted together."""

from __future__ import annotations

import logging

import numpy as np
from accelerate import PartialState
from accelerate.utils import gather_object

from ..scoring.distributed import num_processes
from ..scoring.weighting import BATCH_WEIGHTINGS, compute_weights

logger = logging.getLogger(__name__)


class StepWeigher:
    """Scores -> weights for the examples of one optimizer step, by the run's `ica_weighting`.

    With several processes the step is the global one: every process's scores are gathered and weighted together
    (the schemes that compare a batch's scores compare all of them), and each process keeps its own weights.

    Args:
        args ([`ICAArguments`]): `ica_weighting`, `ica_temperature`, `ica_holdout_cutoff`.
    """

    def __init__(self, args):
        self.scheme = args.ica_weighting
        self.temperature = args.ica_temperature
        self.cutoff = args.ica_holdout_cutoff
        self._warned_single = False

    def __call__(self, scores, indices, step: int, state) -> tuple[np.ndarray, np.ndarray, np.ndarray, slice]:
        """Returns (every process's indices, their scores, their weights, this process's slice of them). `state`
        ([`ICAState`]) gives the score range (`global_minmax`) and the holdout's scores (`holdout_quantile`)."""
        scores, indices = np.asarray(scores, dtype=np.float64), np.asarray(indices)
        all_scores, all_indices, mine = scores, indices, slice(None)
        if num_processes() > 1:
            parts = gather_object([(indices, scores)])
            start = sum(len(p[0]) for p in parts[: PartialState().process_index])
            mine = slice(start, start + len(indices))
            all_indices = np.concatenate([p[0] for p in parts])
            all_scores = np.concatenate([p[1] for p in parts])
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
            temperature=self.temperature,
            global_range=state.global_range,
            reference=state.reference,
            cutoff=self.cutoff,
            where=f"training examples (ica_index) {all_indices.tolist()}, rows",
        )
        return all_indices, all_scores, weights, mine
