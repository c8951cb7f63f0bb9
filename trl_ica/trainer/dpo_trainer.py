"""ICA-weighted direct preference optimisation."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from trl import DPOTrainer

from .. import seams
from .dpo_config import ICADPOConfig
from .mixin import INDEX, ICATrainerMixin, add_index, ica_args


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
            pairs (standard or conversational, explicit or implicit prompt).
        holdout_dataset (`datasets.Dataset` or `list[dict]`):
            small clean set; its prompts with their chosen answers are the in-context demonstrations. An SFT-format
            holdout (prompt/completion or `messages`) works too.

    Example:

    ```python
    >>> from trl_ica import ICADPOConfig, ICADPOTrainer
    >>> args = ICADPOConfig("out", beta=0.5, learning_rate=1e-6)
    >>> trainer = ICADPOTrainer(model, args=args, train_dataset=pairs, holdout_dataset=holdout, peft_config=lora)
    >>> trainer.train()
    ```
    """

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
        **kwargs,
    ):
        args = ica_args(args, model, ICADPOConfig, "ICA-DPO")
        indexed = add_index(train_dataset, "ICADPOTrainer", pairs=True)
        super().__init__(model, ref_model, args, data_collator, indexed, eval_dataset, processing_class, **kwargs)
        self._ica_setup(indexed, holdout_dataset, args.max_length)

    def _training_sequences(self, row):
        out = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = (row["prompt_ids"] + row[key])[: self.args.max_length]
            out.append((ids, range(len(row["prompt_ids"]), len(ids))))
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(INDEX, None)
        if index is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._ica.maybe_refresh(self.model, self.state.global_step, self.state.max_steps)
        sft = [(i, w) for i, (t, w) in enumerate(zip(self.loss_types, self.loss_weights)) if t == "sft"]
        policy = {}
        # TRL's "sft" term is one token mean over the batch: it is taken out here and added back weighted
        loss_types = [t for i, t in enumerate(self.loss_types) if i not in dict(sft)]
        loss_weights = [w for i, w in enumerate(self.loss_weights) if i not in dict(sft)]
        with seams.dpo_loss_terms(self, loss_types, loss_weights, use_weighting=True):
            with self._weighting_hook(model, index.cpu().numpy(), policy):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not policy:
            raise self.unweighted_error(
                "`DPOTrainer.compute_loss` calling the policy with `fused_lm_head=True` and scaling each pair's loss "
                "by a factor of its `log_sum_sq_probs` (trl.trainer.dpo_trainer), through which "
                "`ICADPOTrainer._weighting_hook` weights each pair"
            )
        if not sft:
            return result
        loss, outputs = result if return_outputs else (result, None)
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen_mask = inputs["completion_mask"][:, 1:].chunk(2, dim=0)[0].bool()
        chosen_logps = policy["log_probs"][:, -seq_len:].chunk(2, dim=0)[0]
        w = policy["weights"].to(chosen_logps.dtype)
        sft_loss = -(chosen_logps * w[:, None])[chosen_mask].mean()
        for _, weight in sft:
            loss = loss + sft_loss * weight
        return (loss, outputs) if return_outputs else loss

    @contextlib.contextmanager
    def _weighting_hook(self, model, index: np.ndarray, policy: dict):
        """Weight each pair's loss terms through the per-pair factor TRL multiplies them by before averaging.

        TRL multiplies every per-pair loss by `exp(mean_t(log_probs - log_sum_sq_probs))` of the chosen row times
        that of the rejected row (its WPO weighting) under `no_grad`, right before `.mean()`. Setting
        `log_sum_sq_probs` to the policy log-probs minus `log w_i` on the chosen row's completion tokens makes that
        factor `w_i` (times TRL's own WPO factor when `use_weighting=True`), for every loss type. Only the first
        forward of the step is the policy's: with a PEFT reference the same model runs again with the adapter off.
        TRL applies the factor in place, which autograd refuses for the hinge loss (`relu` keeps its output for the
        backward); [`_OutOfPlaceProduct`] makes that one product out of place.
        """

        def hook(module, args, kwargs, output):
            log_probs = seams.fused_log_probs(kwargs, output)  # (2B, T-1): chosen rows, then rejected rows
            if policy or log_probs is None:
                return None
            label_mask, log_sum_sq_probs = seams.dpo_weighting_fields(output, wpo=self.args.use_weighting)
            policy["log_probs"] = log_probs
            w = self._ica_weights(
                index, log_probs, lambda: log_probs.detach().double().sum(1).cpu().numpy().reshape(2, -1).T,
                dtype=torch.float32,
            )  # fmt: skip
            policy["weights"] = w
            shift = torch.cat([torch.log(w), torch.zeros_like(w)])[:, None]
            base = log_sum_sq_probs if self.args.use_weighting else log_probs.detach()
            lssp = torch.where(label_mask, base.float() - shift, base.float())
            output.log_sum_sq_probs = lssp.as_subclass(_OutOfPlaceProduct)
            return output

        handle = model.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


class _OutOfPlaceProduct(torch.Tensor):
    """A tensor whose descendants turn `loss *= factor` into `loss = loss * factor`, returning a plain tensor.

    TRL scales each pair's loss in place with a factor computed from `log_sum_sq_probs`; in place, the product breaks
    the backward of losses that keep their output (the hinge loss's `relu`). Every other operation behaves as usual.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.mul_, torch.Tensor.__imul__) and type(args[0]) is torch.Tensor:
            target, factor = args
            return target * factor.as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs or {})
