"""ICA-weighted direct preference optimisation."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from trl import DPOTrainer

from .. import seams
from .dpo_config import ICADPOConfig
from .mixin import INDEX, ICATrainerMixin, add_index, ica_args, streamed_row_view


class ICADPOTrainer(ICATrainerMixin, DPOTrainer):
    """
    [`~trl.DPOTrainer`] whose loss weights each preference pair by its ICA score ([arXiv
    2510.14459](https://huggingface.co/papers/2510.14459)).

    The score of (x, y_w, y_l) is how much k holdout demonstrations in context raise the chosen-minus-rejected margin:
    `[log p(y_w | D, x) - log p(y_l | D, x)] - [log p(y_w | x) - log p(y_l | x)]` under the current policy. Scores
    become per-pair weights `w_i` (`ica_weighting`) that multiply each pair's loss where TRL averages it, for every
    `loss_type` and with its `loss_weights`: the loss is `sum_t loss_weight_t * mean_i(w_i * loss_t,i)`. The `"sft"`
    term, which TRL averages over the chosen tokens of the batch, weights each pair's tokens by `w_i`. With all
    weights 1 it is exactly `DPOTrainer`'s loss; evaluation is unweighted, and TRL's metrics (rewards, log-probs,
    accuracies) are logged as they are, with `ica/*` next to them.

    The three reference set-ups of TRL work unchanged: a PEFT adapter disabled, `precompute_ref_log_probs=True`, or an
    explicit `ref_model`.

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs:
            as [`~trl.DPOTrainer`]; `args` is an [`ICADPOConfig`], `train_dataset` a `datasets.Dataset` of preference
            pairs (standard or conversational, explicit or implicit prompt, tool calls and `tools` included), or a
            `datasets.IterableDataset` of them (each pair scored once, at its step, by the model of that step).
        holdout_dataset (`datasets.Dataset` or `list[dict]`):
            small clean set; its prompts with their chosen answers are the in-context demonstrations. An SFT-format
            holdout (prompt/completion or `messages`) works too.
        scoring_model (`str` or `PreTrainedModel`, *optional*):
            a fixed model that scores the examples instead of the model being trained (see `ica_scoring_model`, its
            name-or-path form in the config); a loaded model is used in its own dtype, on the training device.
        scoring_processing_class (*optional*):
            the scoring model's tokenizer; by default loaded from where the scoring model was loaded from.

    Example:

    ```python
    >>> from trl_ica import ICADPOConfig, ICADPOTrainer
    >>> args = ICADPOConfig("out", beta=0.5, learning_rate=1e-6)
    >>> trainer = ICADPOTrainer(model, args=args, train_dataset=pairs, holdout_dataset=holdout, peft_config=lora)
    >>> trainer.train()
    ```
    """

    _ica_pairs = True

    _tag_names = ["trl", "dpo", "ica"]
    _name = "ICA-DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: ICADPOConfig | None = None,
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
        args = ica_args(args, model, ICADPOConfig, "ICA-DPO")
        indexed = add_index(train_dataset, "ICADPOTrainer", pairs=True, row_view=streamed_row_view)
        super().__init__(model, ref_model, args, data_collator, indexed, eval_dataset, processing_class, **kwargs)
        self._ica_setup(indexed, holdout_dataset, args.max_length, scoring=(scoring_model, scoring_processing_class))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss with pair i weighted by its ICA weight w_i. The weight enters in two places:

        1. **Every preference term** (each `loss_type` but `"sft"`): TRL multiplies each pair's loss by a per-pair
           factor before the batch mean; [`_policy_weights`] sets that factor to w_i, so each term becomes
           `mean_i(w_i * loss_t,i)`.
        2. **The `"sft"` term**, a token mean over the batch's chosen completions: it is left out of TRL's call and
           added back by [`_weighted_sft_loss`], each pair's tokens weighted by w_i.
        """
        index = inputs.pop(INDEX, None)
        if index is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        terms = list(zip(self.loss_types, self.loss_weights))
        preference = [(t, weight) for t, weight in terms if t != "sft"]
        policy = {}
        loss_types, loss_weights = [t for t, _ in preference], [weight for _, weight in preference]
        with seams.dpo_loss_terms(self, loss_types, loss_weights, use_weighting=True):
            with self._policy_weights(model, index.cpu().numpy(), policy):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not policy or not self._factors_applied(policy):
            raise self.unweighted_error(
                "`DPOTrainer.compute_loss` calling the policy with `fused_lm_head=True` and scaling each pair's loss "
                "by a factor of its `log_sum_sq_probs` (trl.trainer.dpo_trainer), which `seams.dpo_set_pair_factor` "
                "sets to the pair's weight"
            )
        sft = [weight for t, weight in terms if t == "sft"]
        if not sft:
            return result
        loss, outputs = result if return_outputs else (result, None)
        sft_loss = self._weighted_sft_loss(inputs, policy["log_probs"], policy["weights"])
        for weight in sft:
            loss = loss + sft_loss * weight
        return (loss, outputs) if return_outputs else loss

    def _factors_applied(self, policy: dict) -> bool:
        """Whether TRL multiplied each preference term's per-pair losses by the factor the weights set, this step.

        The identity relied on: TRL's factor is `exp(mean_t(log_probs - log_sum_sq_probs))` over a row's completion
        tokens, chosen row times rejected row; with `log_sum_sq_probs` set to `log_probs - log w_i` on the chosen row
        and to `log_probs` on the rejected one, it is `exp(log w_i) * exp(0) = w_i`. Without WPO (`use_weighting`)
        each recorded factor must be the weights, up to float32's rounding of that mean (a few ulp of the largest
        |log-prob|); with WPO it is TRL's own factor times them, so only its application is checked."""
        factors = seams.dpo_applied_factors()
        preference_terms = sum(1 for t in self.loss_types if t != "sft")
        if len(factors) < preference_terms:
            return False
        if self.args.use_weighting:
            return True
        weights = policy["weights"].detach().float()
        scale = float(policy["log_probs"].detach().float().abs().max()) + float(
            torch.log(weights[weights > 0]).abs().max() if (weights > 0).any() else 0.0
        )
        rtol = 16 * torch.finfo(torch.float32).eps * max(1.0, scale)
        return all(
            f.shape == weights.shape and torch.allclose(f.float().to(weights.device), weights, rtol=rtol, atol=0)
            for f in factors
        )

    @contextlib.contextmanager
    def _policy_weights(self, model, index: np.ndarray, policy: dict):
        """On the policy's forward (the first of the step's forwards: with a PEFT reference the same model runs again
        with the adapter off), look up the pairs' weights and set TRL's per-pair loss factor to them
        ([`seams.dpo_set_pair_factor`]; with `use_weighting=True` it stays TRL's WPO factor times w_i). `policy`
        gets the forward's `log_probs` and the `weights`."""

        def hook(module, args, kwargs, output):
            log_probs = seams.fused_log_probs(kwargs, output)  # (2B, T-1): chosen rows, then rejected rows
            if policy or log_probs is None:
                return None
            w = self._ica_weights(index, log_probs, dtype=torch.float32)
            policy.update(log_probs=log_probs, weights=w)
            seams.dpo_set_pair_factor(output, log_probs, w, wpo=self.args.use_weighting)
            return output

        handle = model.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @staticmethod
    def _weighted_sft_loss(inputs: dict, log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """TRL's `"sft"` term, the mean NLL over the chosen completions' tokens, with each pair's tokens weighted:
        `-sum_i w_i sum_t log p(y_w,t) / chosen tokens`."""
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen_mask = inputs["completion_mask"][:, 1:].chunk(2, dim=0)[0].bool()
        chosen_logps = log_probs[:, -seq_len:].chunk(2, dim=0)[0]
        return -(chosen_logps * weights.to(chosen_logps.dtype)[:, None])[chosen_mask].mean()
