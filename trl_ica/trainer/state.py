"""What a run has computed and a checkpoint keeps: the scores, the demonstrations, the holdout's own scores, and the
fingerprint of the data and settings they were computed for."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from ..data_io import written_whole

logger = logging.getLogger(__name__)

STATE_FILE = "ica_state.npz"
#: The `ica_*` fields besides the score's own ([`ICAScoringOptions.record`]) that saved state depends on: how scores
#: become weights and enter the loss, and when scoring happens. The others (the scoring budget, where given scores
#: came from, the preset the settings were filled from) change no saved number.
STATE_FIELDS = (
    "ica_weighting",
    "ica_holdout_cutoff",
    "ica_holdout_rescore_steps",
    "ica_refresh",
    "ica_max_length",
    "ica_loss_reduction",
    "ica_weight_mode",
    "ica_token_quantile",
)
NOT_FINGERPRINTED = (
    "ica_scoring_batch_size",
    "ica_scoring_max_tokens",
    "ica_scoring_sharing",
    "ica_scoring_overhead",
    "ica_scores_file",
    "ica_preset",
)
#: Fingerprinted by the name of the model that scores (given as a name or a loaded model), not by this field.
SCORER_FIELD = "ica_scoring_model"


def _digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def fingerprint(builder, training, scorer: str | None = None) -> dict[str, str]:
    """What saved state depends on: the training rows, the holdout, the score's options, the [`STATE_FIELDS`] and the
    scoring model (`scorer`, its name; None when the trained model scores)."""
    settings = {**builder.options.comparable(), **training.record()}
    if scorer is not None:
        settings["scoring model"] = scorer
    return {
        "training rows": _digest(builder.candidates),
        "holdout rows": _digest(builder.holdout),
        **{name: repr(value) for name, value in sorted(settings.items())},
    }


@dataclasses.dataclass
class ICAState:
    """The numbers a run has computed so far, all indexed by `ica_index` (training rows) or holdout row.

    Attributes:
        scores (`np.ndarray`): the latest score of each training example (NaN until scored).
        refreshes_done (`int`): scorings of the whole training set so far (given scores count as one).
        global_range (`tuple[float, float]` or None): lowest and highest score seen, for `global_minmax`.
        reference (`np.ndarray` or None): `holdout_quantile`: the holdout's own latest scores.
        reference_step (`int` or None): the optimizer step they were computed at.
        references_done (`int`): scorings of the holdout so far.
        last_scored_step (`int` or None): the step of the latest scoring of the whole training set.
        resumed_step (`int` or None): the checkpoint's step, when the run resumed from one.
        tokens (`list[np.ndarray]` or None): `ica_token_quantile`: each training example's token log-probs with
            its demonstrations, from the latest scoring.
        reference_tokens (`list[np.ndarray]` or None): `ica_token_quantile`: the holdout's own, from its latest
            scoring.
    """

    scores: np.ndarray
    refreshes_done: int = 0
    global_range: tuple[float, float] | None = None
    reference: np.ndarray | None = None
    reference_step: int | None = None
    references_done: int = 0
    last_scored_step: int | None = None
    resumed_step: int | None = None
    tokens: list | None = None
    reference_tokens: list | None = None

    @classmethod
    def empty(cls, num_examples: int) -> ICAState:
        return cls(scores=np.full(num_examples, np.nan))

    def grow(self, num_examples: int) -> None:
        """Room for `num_examples` scores (NaN until scored): a streamed training set grows as its rows arrive."""
        if num_examples > len(self.scores):
            self.scores = np.concatenate([self.scores, np.full(num_examples - len(self.scores), np.nan)])

    def widen_range(self, low: float, high: float) -> None:
        """Extend `global_range` to include [low, high]."""
        if self.global_range is not None:
            low, high = min(low, self.global_range[0]), max(high, self.global_range[1])
        self.global_range = (float(low), float(high))

    def save(self, folder: str, step: int, demo_indices: np.ndarray, fingerprint: dict) -> None:
        """`ica_state.npz` in `folder`, written whole."""
        low, high = self.global_range if self.global_range is not None else (np.nan, np.nan)
        with written_whole(os.path.join(folder, STATE_FILE)) as temporary:
            np.savez(
                temporary,
                fingerprint=np.array(json.dumps(fingerprint)),
                step=step,
                scores=self.scores,
                refreshes_done=self.refreshes_done,
                global_range=np.array([low, high]),
                demo_indices=demo_indices,
                reference=self.reference if self.reference is not None else np.zeros(0),
                reference_step=-1 if self.reference_step is None else self.reference_step,
                references_done=self.references_done,
                **_flat("tokens", self.tokens),
                **_flat("reference_tokens", self.reference_tokens),
            )

    @classmethod
    def load(cls, folder: str, fingerprint: dict, with_reference: bool) -> tuple[ICAState, np.ndarray]:
        """The state saved in `folder` and its demonstrations, refused unless it was computed for `fingerprint`
        (this run's data and settings); the holdout's scores are restored when `with_reference`."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming from {folder!r}, which has no {STATE_FILE}: it was not saved by an ICA trainer, so the "
                "ICA scores cannot be restored."
            )
        saved = np.load(path)
        if "fingerprint" not in saved:
            raise ValueError(
                f"{path} was saved by an older trl_ica without a record of its data and settings, so resuming cannot "
                "check that they are this run's; start the run afresh."
            )
        then = json.loads(str(saved["fingerprint"]))
        changed = [k for k in sorted(set(then) | set(fingerprint)) if then.get(k) != fingerprint.get(k)]
        if changed:
            details = ", ".join(
                k if k.endswith("rows") else f"{k}: checkpoint {then.get(k)}, now {fingerprint.get(k)}"
                for k in changed
            )
            raise ValueError(
                f"Cannot resume from {folder!r}: its ICA state was computed for other data or settings ({details}). "
                "Resume with the training set, holdout and `ica_*` settings of that run, or start afresh in another "
                "`output_dir`."
            )
        low, high = saved["global_range"]
        state = cls(
            scores=saved["scores"],
            refreshes_done=int(saved["refreshes_done"]),
            global_range=None if np.isnan(low) else (float(low), float(high)),
            resumed_step=int(saved["step"]),
        )
        state.tokens = _unflat(saved, "tokens")
        if with_reference and saved["reference"].size:
            state.reference = saved["reference"]
            state.reference_step = int(saved["reference_step"])
            state.references_done = int(saved["references_done"])
            state.reference_tokens = _unflat(saved, "reference_tokens")
        logger.info("Restored ICA state from %s (%d scoring(s) done).", folder, state.refreshes_done)
        return state, saved["demo_indices"]


def _flat(name: str, arrays: list | None) -> dict:
    """Per-row arrays as one array and their lengths, for `np.savez`; nothing when None."""
    if arrays is None:
        return {}
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    flat = np.concatenate([np.asarray(a, dtype=np.float32) for a in arrays] or [np.zeros(0, np.float32)])
    return {name: flat, f"{name}_lengths": lengths}


def _unflat(saved, name: str) -> list | None:
    if name not in saved:
        return None
    return np.split(saved[name], np.cumsum(saved[f"{name}_lengths"])[:-1])
