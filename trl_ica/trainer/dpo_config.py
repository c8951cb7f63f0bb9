"""Configuration of [`ICADPOTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOConfig

from .ica_args import ICAArguments

# Losses that sort the batch, so a pair's loss term is no longer its own and per-pair weights have no meaning
SORTING_LOSSES = ("aot", "aot_unpaired")


@dataclass
class ICADPOConfig(ICAArguments, DPOConfig):
    r"""
    [`~trl.DPOConfig`] with the `ica_*` fields of [`ICAArguments`] (see there for each field); everything else is
    TRL's. Every `loss_type` except the batch-sorting `"aot"` and `"aot_unpaired"` can be weighted, combined with
    `loss_weights` as in TRL.

    Example:

    ```python
    >>> from trl_ica import ICADPOConfig
    >>> args = ICADPOConfig(output_dir="out", beta=0.5, learning_rate=1e-6, ica_num_demos=3)
    ```
    """

    def __post_init__(self):
        self.choose_precision()
        super().__post_init__()
        self.validate_ica("preference")
        sorting = [loss for loss in self.loss_type if loss in SORTING_LOSSES]
        if sorting:
            raise ValueError(
                f"`loss_type` {sorting} cannot be ICA-weighted: these losses sort the pairs of a batch, so no loss "
                f"term belongs to one pair. Use any other loss type, got `loss_type`={self.loss_type}."
            )
