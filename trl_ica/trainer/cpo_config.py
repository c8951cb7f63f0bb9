"""Configurations of [`ICACPOTrainer`]: CPO, and SimPO with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl.experimental.cpo import CPOConfig

from .ica_args import ICAArguments


@dataclass
class ICACPOConfig(ICAArguments, CPOConfig):
    r"""
    [`~trl.experimental.cpo.CPOConfig`] with the `ica_*` fields of [`ICAArguments`] (see there for each field);
    everything else is TRL's. SimPO is `loss_type="simpo"` with `cpo_alpha=0` (or [`ICASimPOConfig`]).

    Example:

    ```python
    >>> from trl_ica import ICACPOConfig
    >>> args = ICACPOConfig(output_dir="out", loss_type="sigmoid", cpo_alpha=1.0, ica_refresh="online")
    ```
    """

    def __post_init__(self):
        self.choose_precision()
        super().__post_init__()
        self.validate_ica("preference")
        if self.is_encoder_decoder:
            raise ValueError(
                "ICA scores decoder-only causal language models; `is_encoder_decoder=True` is unsupported."
            )


@dataclass
class ICASimPOConfig(ICACPOConfig):
    r"""
    [`ICACPOConfig`] for SimPO: `loss_type="simpo"`, `cpo_alpha=0`, and the SimPO settings of the ICA paper: `beta`
    2.5, `simpo_gamma` 1.375 (gamma/beta 0.55), `learning_rate` 1e-6. Every field can still be overridden.

    Example:

    ```python
    >>> from trl_ica import ICASimPOConfig
    >>> args = ICASimPOConfig(output_dir="out")
    >>> args.loss_type, args.cpo_alpha, args.beta, args.simpo_gamma / args.beta
    ('simpo', 0.0, 2.5, 0.55)
    ```
    """

    loss_type: str = field(default="simpo", metadata={"help": "Type of loss to use; SimPO by default."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "Weight of the NLL term; 0 for SimPO."})
    beta: float = field(default=2.5, metadata={"help": "SimPO's reward scale."})
    simpo_gamma: float = field(default=1.375, metadata={"help": "SimPO's target reward margin (gamma/beta = 0.55)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
