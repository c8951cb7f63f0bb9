"""Configuration of [`ICASFTTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig

from .ica_args import ICAArguments


@dataclass
class ICASFTConfig(ICAArguments, SFTConfig):
    r"""
    [`~trl.SFTConfig`] with the `ica_*` fields of [`ICAArguments`] (see there for each field); everything else is
    TRL's.

    Example:

    ```python
    >>> from trl_ica import ICASFTConfig
    >>> args = ICASFTConfig(output_dir="out", ica_num_demos=3, ica_refresh="online")
    ```
    """

    def __post_init__(self):
        self.choose_precision()
        super().__post_init__()
        self.validate_ica("sft")
        if self.packing and self.packing_strategy != "bfd":
            raise ValueError(
                f"`packing_strategy`={self.packing_strategy!r} splits sequences across packed rows, so a token no "
                "longer belongs to one example and per-example weights have no meaning. Use `packing_strategy='bfd'` "
                "(TRL's default, which keeps every sequence whole), or `packing=False`."
            )
        if self.padding_free and self.max_length is not None and not self.packing:
            raise ValueError(
                f"`padding_free=True` with `max_length`={self.max_length}: TRL enforces `max_length` there only by "
                "packing. Set `packing=True` (TRL's `bfd` packing, weighted per example), `max_length=None` (truncate "
                "long rows beforehand if needed), or `padding_free=False`."
            )
        if self.loss_type != "nll":
            raise ValueError(f"ICA weighting supports `loss_type='nll'`, got {self.loss_type!r}.")
        if self.label_smoothing_factor:
            raise ValueError(
                f"ICA weighting does not support `label_smoothing_factor`={self.label_smoothing_factor}: the label "
                "smoothing loss path cannot carry per-example weights. Set it to 0."
            )
        if (self.dataset_kwargs or {}).get("skip_prepare_dataset") and self.packing:
            raise ValueError(
                "`dataset_kwargs={'skip_prepare_dataset': True}` with `packing=True`: TRL then trains the rows as "
                "they come, already packed, and which example each packed sequence came from is lost, so it has no "
                "weight. Pack with TRL's preparation (drop `skip_prepare_dataset`), or set `packing=False`."
            )
