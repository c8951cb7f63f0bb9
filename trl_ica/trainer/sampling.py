"""ICA weights as sampling probabilities (`ica_weight_mode="sampling"`): every batch full, the loss the stock one.

An epoch draws as many rows as the training set has, each row about `n * w_i / sum(w)` times (systematic
resampling: the floor or the ceiling of that expectation, never more spread), and shuffles the draws with the very
permutation the stock sampler would use for that epoch. So unit weights give the stock order bit for bit, and a row
of weight 0 is never drawn (no forward, no backward). A weighted loss keeps every row in its batch slot and scales
it down, which leaves a step fewer rows' worth of sample (docs/scores.md, "Weights or sampling").

The stock sampler these replace is accelerate's `SeedableRandomSampler`: every process draws the same order from
`data_seed` (else the seed the run set) plus the epoch, and `BatchSamplerShard` deals its batches out. The sampler
here keeps that contract: the same draws on every process, a new draw per epoch (`set_epoch`), and a resumed run
(which skips the batches already trained) sees the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def systematic_counts(weights, draws: int, offset: float) -> np.ndarray:
    """How many times each row is drawn when `draws` rows are taken in proportion to `weights` by systematic
    resampling with the offset `offset` in [0, 1): row i gets the floor or the ceiling of `draws * w_i / sum(w)`,
    the counts sum to `draws`, and a row of weight 0 gets 0. With every weight equal and `draws` the number of rows,
    each row is drawn once whatever the offset (the points `offset + j` fall one into each unit interval)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    total = w.sum()
    if not total > 0:
        raise ValueError("systematic_counts needs at least one positive weight.")
    # Edges in units of one draw; with equal weights and draws == len(w) they are the integers 1..n exactly.
    edges = np.cumsum(w) * (draws / total) if not np.all(w == w[0]) or draws != w.size else np.arange(1.0, w.size + 1)
    edges[-1] = draws  # every point lands in some row, whatever the rounding of the cumulative sum
    # one point per unit interval [j, j + 1): the sum j + offset may round up to j + 1, so it is held below
    start = np.arange(draws, dtype=np.float64)
    points = np.minimum(start + min(max(offset, 0.0), 1.0), np.nextafter(start + 1.0, 0.0))
    below = np.searchsorted(points, edges, side="left")
    return np.diff(np.concatenate([[0], below])).astype(np.int64)


def epoch_order(weights, seed: int, epoch: int) -> list[int]:
    """The rows drawn in epoch `epoch`, in order: `len(weights)` draws by [`systematic_counts`], shuffled by
    `torch.randperm` from a generator seeded `seed + epoch` (what the stock sampler permutes the rows with), the
    resampling offset from a separate stream so that it takes nothing from the permutation's."""
    n = len(weights)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    permutation = torch.randperm(n, generator=generator).numpy()
    offset = float(np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0x1CA]).random())
    drawn = np.repeat(np.arange(n), systematic_counts(weights, n, offset))
    return drawn[permutation].tolist()


class WeightedEpochSampler(Sampler[int]):
    """The training sampler of `ica_weight_mode="sampling"`.

    Args:
        num_rows (`int`): rows of the training dataset the trainer iterates.
        weights (`Callable[[], tuple[np.ndarray, int]]`): the current weight of each dataset row and a version
            number that changes whenever the weights do (a refresh).
        version (`Callable[[], object]`): that version alone, cheap: checked before every draw, while the weights
            are computed only when it changes.
        seed (`int`): the stock sampler's seed (`data_seed`, else the run's seed).
        step_rows (`int`): rows one optimizer step draws over every process (`per_device_train_batch_size *
            gradient_accumulation_steps * processes`); the weights must keep at least this many rows (every row of
            a smaller training set).
        before_step (`Callable[[int], None]`, *optional*): called with the optimizer step a draw opens, before the
            rows of that step are drawn: where a refresh due at that step scores. Steps are counted as the trainer
            counts them (each epoch starts a step; `steps_per_epoch` per epoch).
        steps_per_epoch (`int`): optimizer steps in one epoch.
    """

    def __init__(
        self,
        num_rows: int,
        weights: Callable[[], tuple[np.ndarray, int]],
        seed: int,
        step_rows: int,
        before_step: Callable[[int], None] | None = None,
        steps_per_epoch: int = 1,
        version: Callable[[], object] | None = None,
    ):
        self.num_rows, self.weights, self.seed, self.step_rows = num_rows, weights, int(seed), step_rows
        self.version = version if version is not None else (lambda: weights()[1])
        self.before_step, self.steps_per_epoch = before_step, steps_per_epoch
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def checked_weights(self) -> tuple[np.ndarray, int]:
        """The current weights, refused when too few rows keep any: sampling would otherwise repeat a handful of
        rows in every step (or have nothing to draw)."""
        weights, version = self.weights()
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.num_rows,):
            raise ValueError(
                f"The sampling weights have shape {weights.shape}; the training set has {self.num_rows} rows."
            )
        if np.isnan(weights).any() or (weights < 0).any():
            raise ValueError("ICA sampling weights must be non-negative numbers.")
        kept = int((weights > 0).sum())
        # a training set smaller than one step fills it with every row once, as the stock sampler does
        if kept < min(self.step_rows, self.num_rows):
            raise ValueError(
                f"ica_weight_mode='sampling': {kept} of {self.num_rows} training rows kept a weight above 0, fewer "
                f"than the {self.step_rows} rows one optimizer step draws, so every step would repeat rows. The "
                "scores put almost the whole training set below the holdout: check the holdout and the data, or use "
                "`ica_weight_mode='loss'`."
            )
        return weights, version

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        order, version = None, None
        for position in range(self.num_rows):
            if position % self.step_rows == 0 and self.before_step is not None:
                self.before_step(epoch * self.steps_per_epoch + position // self.step_rows)
            if order is None or self.version() != version:
                weights, version = self.checked_weights()  # a refresh: the rest of the epoch from the new weights
                order = epoch_order(weights, self.seed, epoch)
            yield order[position]
        self.epoch = epoch + 1


def steps_per_epoch(num_rows: int, batch_size: int, processes: int, accumulation: int, drop_last: bool) -> int:
    """Optimizer steps per epoch as the trainer counts them: its per-process micro-batches (accelerate deals out
    batches of `batch_size`, every process the same number), grouped by `accumulation`, the last group partial."""
    per_process = num_rows // (batch_size * processes) if drop_last else math.ceil(num_rows / (batch_size * processes))
    return max(math.ceil(per_process / accumulation), 1)
