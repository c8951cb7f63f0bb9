"""ICA-weighted CPO and SimPO."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from trl.experimental.cpo import CPOTrainer

from .. import seams
from .cpo_config import ICACPOConfig
from .mixin import INDEX, ICATrainerMixin, add_index, ica_args, loss_reaches
from .model_card import SIMPO_PAPER


@dataclasses.dataclass
class _BatchWeights:
    """The ICA weights of the batch being trained on, on their way through TRL's CPO loss."""

    index: np.ndarray  # the pairs' `ica_index`
    weights: torch.Tensor | None = None  # (B,), set by `concatenated_forward`
    weighted_losses: torch.Tensor | None = None  # (B,) w_i * loss_i, set by `cpo_loss`; the loss must come from it


class ICACPOTrainer(ICATrainerMixin, CPOTrainer):
    """
    [`~trl.experimental.cpo.CPOTrainer`] whose loss weights each preference pair by its ICA score ([arXiv
    2510.14459](https://huggingface.co/papers/2510.14459)); with [`ICASimPOConfig`] it is ICA-weighted SimPO.

    The score of (x, y_w, y_l) is how much k holdout demonstrations in context raise the chosen-minus-rejected margin,
    `[log p(y_w | D, x) - log p(y_l | D, x)] - [log p(y_w | x) - log p(y_l | x)]`, under the current policy. Scores
    become per-pair weights `w_i` (`ica_weighting`), which enter the loss in two places:

    - [`cpo_loss`]: the preference loss is `mean_i(w_i * loss_i)`;
    - [`concatenated_forward`]: the CPO NLL term (`cpo_alpha > 0`) is `sum_i w_i * nll_i / chosen_tokens`.

    With all weights 1 it is exactly `CPOTrainer`'s loss. Evaluation is unweighted; TRL's metrics are logged as they
    are, with `ica/*` next to them.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs:
            as [`~trl.experimental.cpo.CPOTrainer`]; `args` is an [`ICACPOConfig`] or [`ICASimPOConfig`],
            `train_dataset` a `datasets.Dataset` of preference pairs (standard or conversational, explicit or
            implicit prompt).
        holdout_dataset (`datasets.Dataset` or `list[dict]`):
            small clean set; its prompts with their chosen answers are the in-context demonstrations.
        scoring_model (`str` or `PreTrainedModel`, *optional*):
            a fixed model that scores the examples instead of the model being trained (see `ica_scoring_model`, its
            name-or-path form in the config); a loaded model is used in its own dtype, on the training device.
        scoring_processing_class (*optional*):
            the scoring model's tokenizer; by default loaded from where the scoring model was loaded from.

    Example:

    ```python
    >>> from trl_ica import ICACPOTrainer, ICASimPOConfig
    >>> trainer = ICACPOTrainer(model, args=ICASimPOConfig("out"), train_dataset=pairs, holdout_dataset=holdout)
    >>> trainer.train()
    ```
    """

    _ica_pairs = True

    _tag_names = ["trl", "cpo", "ica"]

    @property
    def _name(self) -> str:  # read by TRL's model card
        return "ICA-SimPO" if self.loss_type == "simpo" else "ICA-CPO"

    def _ica_parent(self) -> tuple[str, dict]:
        return ("SimPO", SIMPO_PAPER) if self.loss_type == "simpo" else super()._ica_parent()

    def __init__(
        self,
        model=None,
        args: ICACPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        holdout_dataset=None,
        scoring_model=None,
        scoring_processing_class=None,
        **kwargs,
    ):
        args = ica_args(args, model, ICACPOConfig, "ICA-CPO")
        for name, dataset in (("train_dataset", train_dataset), ("holdout_dataset", holdout_dataset)):
            for column in ("tools", "chat_template_kwargs"):
                if column in (getattr(dataset, "column_names", None) or ()):
                    raise ValueError(
                        f"`{name}` has a `{column}` column, which TRL's CPOTrainer does not give the chat template "
                        "(trl.experimental.cpo renders each row without it), so ICA could not score the tokens it "
                        "trains on. Drop the column to train and score the conversations without it, or use "
                        "ICADPOTrainer, which renders it."
                    )
        indexed = add_index(train_dataset, "ICACPOTrainer", pairs=True)
        self._ica_batch: _BatchWeights | None = None  # during a training `compute_loss` only
        super().__init__(model, args, data_collator, indexed, eval_dataset, processing_class, **kwargs)
        self._ica_setup(indexed, holdout_dataset, self.max_length, scoring=(scoring_model, scoring_processing_class))

    def _log_ica(self, metrics: dict[str, float]) -> None:
        self.store_metrics(metrics, train_eval="train")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(INDEX, None)
        if index is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._ica_batch = batch = _BatchWeights(index.cpu().numpy())
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._ica_batch = None
        loss = result[0] if return_outputs else result
        if batch.weighted_losses is None or not loss_reaches(loss, batch.weighted_losses):
            raise self.unweighted_error(
                "`CPOTrainer.compute_loss` going through `concatenated_forward` and `cpo_loss` "
                "(trl.experimental.cpo), which `ICACPOTrainer` overrides to weight each pair"
            )
        return result

    def concatenated_forward(self, model, batch):
        """TRL's forward; in a training step it also looks up the pairs' weights and weights the NLL term:
        `sum_i w_i * nll_i / chosen_tokens`."""
        out = super().concatenated_forward(model, batch)
        if self._ica_batch is None:
            return out
        index = self._ica_batch.index
        chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss, rest = seams.cpo_forward_outputs(out)
        labels = seams.cpo_labels(self, batch, chosen_logits.device)[:, 1:]

        w = self._ica_batch.weights = self._ica_weights(index, chosen_logps)
        if self.cpo_alpha != 0:
            chosen_labels = labels[: len(index)]
            token_nll = F.cross_entropy(
                chosen_logits[:, :-1].flatten(0, 1), chosen_labels.flatten(), reduction="none"
            ).view_as(chosen_labels)
            nll_loss = (token_nll * w[:, None].to(token_nll.dtype)).sum() / (chosen_labels != -100).sum()
        return (chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss, *rest)

    def cpo_loss(self, policy_chosen_logps, policy_rejected_logps):
        """TRL's per-pair losses; in a training step each multiplied by its pair's weight: `w_i * loss_i`, which TRL
        then averages."""
        losses, chosen_rewards, rejected_rewards = super().cpo_loss(policy_chosen_logps, policy_rejected_logps)
        batch = self._ica_batch
        if batch is not None and batch.weights is not None:
            losses = batch.weighted_losses = losses * batch.weights.to(losses.dtype)
        return losses, chosen_rewards, rejected_rewards
