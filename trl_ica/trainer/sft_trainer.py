"""ICA-weighted supervised fine-tuning."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from datasets import Dataset
from trl import SFTTrainer

from .. import seams
from .mixin import INDEX, ROWS, ICATrainerMixin, add_index, ica_args, loss_reaches, scoring_view, streamed_row_view
from .sft_config import ICASFTConfig

TOKEN_INDEX = "ica_token_index"  # each token's example, carried through packing

logger = logging.getLogger(__name__)


class ICASFTTrainer(ICATrainerMixin, SFTTrainer):
    """
    [`~trl.SFTTrainer`] whose loss weights each example by its ICA score (In-Context Approximation of the holdout
    loss, [arXiv 2510.14459](https://huggingface.co/papers/2510.14459)).

    The score of (x, y) is `log p(y | k holdout demos, x) - log p(y | x)` under the current model; scores become
    per-example weights (`ica_weighting`) that multiply each example's summed token loss before TRL's own reduction,
    so the loss is `sum_i w_i * nll_i / num_tokens` (`ica_loss_reduction="weighted_mean"`: divided by the weighted
    token count instead). With all weights 1 it is exactly `SFTTrainer`'s loss, gradient accumulation included. Only
    this reduction differs from the parent; evaluation loss is unweighted.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs:
            as [`~trl.SFTTrainer`]; `args` is an [`ICASFTConfig`], `train_dataset` a `datasets.Dataset` in a
            format SFTTrainer trains on (tool calls and `tools` included), or a `datasets.IterableDataset` (each row
            scored once, at its step, by the model of that step).
        holdout_dataset (`datasets.Dataset` or `list[dict]`):
            small clean set in the training data's format; its rows are the in-context demonstrations.
        scoring_model (`str` or `PreTrainedModel`, *optional*):
            a fixed model that scores the examples instead of the model being trained (see `ica_scoring_model`, its
            name-or-path form in the config); a loaded model is used in its own dtype, on the training device.
        scoring_processing_class (*optional*):
            the scoring model's tokenizer; by default loaded from where the scoring model was loaded from.

    Example:

    ```python
    >>> from trl_ica import ICASFTConfig, ICASFTTrainer
    >>> trainer = ICASFTTrainer(model, args=ICASFTConfig("out"), train_dataset=train, holdout_dataset=holdout)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "ica"]
    _name = "ICA-SFT"

    def __init__(
        self,
        model,
        args: ICASFTConfig | None = None,
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
        args = ica_args(args, model, ICASFTConfig, "ICA-SFT")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("`compute_loss_func` replaces the loss that ICA weights; it cannot be combined with ICA.")
        formatting_func = kwargs.get("formatting_func")

        def view(dataset, name="train_dataset"):  # the rows scored: what SFTTrainer trains on, as text or as rows
            completion_only = getattr(self, "completion_only_loss", args.completion_only_loss)  # TRL's, once set
            return scoring_view(dataset, formatting_func, args.dataset_text_field, name, completion_only)

        def row_view(row):  # one streamed row, as `view` gives a dataset's
            return streamed_row_view(row, formatting_func, args.dataset_text_field)

        indexed = add_index(train_dataset, "ICASFTTrainer", pairs=False, view=view, row_view=row_view)
        super().__init__(model, args, data_collator, indexed, eval_dataset, processing_class, **kwargs)
        sequence_parallel = seams.sequence_sharding(self.accelerator).get("sp")
        if sequence_parallel is not None and "deepspeed" in sequence_parallel:
            raise ValueError(
                f"ICA weighting cannot run under DeepSpeed sequence parallelism ({sequence_parallel}): there TRL "
                "takes the loss the model computes inside its forward, which per-example weights cannot reach. "
                "Train without sequence parallelism (sp_size=1)."
            )
        scoring = (scoring_model, scoring_processing_class)
        self._ica_setup(indexed, holdout_dataset, args.max_length, view=view, scoring=scoring)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """SFTTrainer's preparation; with packing, the training rows keep which example each packed sequence came
        from: an `ica_index` list per packed row, one entry per sequence in `seq_lengths` order."""
        if not packing or not isinstance(dataset, Dataset) or INDEX not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        prepare = super()._prepare_dataset

        def prepare_with_token_index(data, *rest):
            data = prepare(data, *rest)
            return data.map(lambda row: {TOKEN_INDEX: [row[INDEX]] * len(row["input_ids"])})

        packed = seams.sft_prepare_packed(
            prepare_with_token_index, dataset, processing_class, args, formatting_func, dataset_name, TOKEN_INDEX
        )

        def sequence_index(row):
            starts = np.cumsum([0, *row["seq_lengths"][:-1]])
            return {INDEX: [row[TOKEN_INDEX][s] for s in starts]}

        return packed.map(sequence_index, remove_columns=[TOKEN_INDEX])

    def _loss_units(self, batch):
        """Each example's loss tokens: the positions whose label is not -100, after the shift (position 0 is never
        predicted), per row or (padding-free, packed) per sequence of `seq_idx`."""
        if "labels" not in batch:
            if self.args.ica_loss_reduction == "weighted_mean":
                raise ValueError(
                    "`ica_loss_reduction='weighted_mean'` counts each example's loss tokens from the batch's "
                    f"`labels`, which this collator does not produce (keys {sorted(batch)})."
                )
            return np.ones(len(batch[INDEX]))
        predicted = batch["labels"][:, 1:] != -100
        seq_idx = seams.packed_sequence_index(batch)
        if seq_idx is None:
            return predicted.sum(1).cpu().numpy()
        owner = seq_idx[:, 1:][predicted].long().cpu().numpy()
        return np.bincount(owner, minlength=len(batch[INDEX]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.get(INDEX)
        if index is None or not self.model.training:
            inputs.pop(INDEX, None)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        units = self._loss_units(inputs)
        inputs.pop(INDEX)
        rows = inputs.pop(ROWS, None)  # a streamed batch outside `train()` (`get_batch_samples` takes them in it)
        fired = []
        seq_idx = seams.packed_sequence_index(inputs)
        keep = lambda: self._token_keep(inputs, index.cpu().numpy(), units)  # noqa: E731 - after the weights
        hook = self._weighting_hook(model, index.cpu().numpy(), seq_idx, fired, units, rows, keep)
        with hook:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not fired or not loss_reaches(loss, fired[-1]):
            raise self.unweighted_error(
                "`SFTTrainer.compute_loss` calling the model with `fused_lm_head=True` and reducing its `log_probs` "
                "into the loss (trl.trainer.sft_trainer), which `ICASFTTrainer._weighting_hook` scales"
            )
        return result

    def _token_keep(self, batch, index: np.ndarray, units) -> torch.Tensor | None:
        """`ica_token_quantile`: a `(B, T-1)` 0/1 tensor over the shifted label positions, 0 at the loss tokens
        that leave the loss ([`ICAController.token_masks`]); None without token masks. Each example's loss tokens
        (position 0 and packed sequence starts are never predicted) are its scored response tokens, or their start
        when training truncated the row (`max_length`, which keeps the start): checked token by token, and a
        mismatch stops the step naming the examples."""
        masks = self._ica.token_masks(index)
        if masks is None:
            return None
        if "labels" not in batch:
            raise ValueError(
                "`ica_token_quantile` masks the loss tokens of the batch's `labels`, which this collator "
                f"does not produce (keys {sorted(batch)})."
            )
        predicted = batch["labels"][:, 1:] != -100
        counts = np.asarray(units, dtype=np.int64)
        # the loss tokens run row by row, which is example order, packed or not
        targets = np.split(batch["input_ids"][:, 1:][predicted].cpu().numpy(), np.cumsum(counts)[:-1])
        wrong = [
            n
            for n, (i, trained) in enumerate(zip(index.tolist(), targets))
            if len(trained) > len(masks[n]) or list(self._scored_ids(i)[: len(trained)]) != trained.tolist()
        ]
        if wrong:
            raise seams.SeamError(
                "SFTTrainer's tokenisation of a row (trl.trainer.sft_trainer), which ICA renders again to score it",
                f"the loss tokens of training examples (ica_index) {index[wrong][:5].tolist()} ({counts[wrong][:5]}) "
                f"are not their scored response tokens ({[len(masks[n]) for n in wrong[:5]]}), so the token masks "
                "cannot be placed",
            )
        placed = [m[: len(t)] for m, t in zip(masks, targets)]
        keep = torch.ones(predicted.shape, dtype=torch.float32, device=predicted.device)
        flat = torch.from_numpy(np.concatenate(placed or [np.zeros(0, bool)]).astype(np.float32))
        keep[predicted] = flat.to(keep.device)
        dropped = int(counts.sum() - flat.sum().item())
        self._log_ica({"ica/masked_token_share": dropped / max(1, int(counts.sum()))})
        return keep

    def _scored_ids(self, index: int) -> tuple[int, ...]:
        """The response token ids ICA scores for training example `index`, rendered once per run (the same with or
        without demonstrations) rather than at every step."""
        cache = self.__dict__.setdefault("_ica_scored_ids", {})
        if index not in cache:
            cache[index] = self._ica.builder.unconditioned(index).scored_ids
        return cache[index]

    @contextlib.contextmanager
    def _weighting_hook(
        self, model, index: np.ndarray, seq_idx: torch.Tensor | None, fired: list, units=None, rows=None, keep=None
    ):
        """Scale the fused head's per-token log-probs by their example's weight (and by `keep()`, the token masks,
        read once the weights exist), right before TRL reduces them; `fired` gets an entry when it did."""

        def hook(module, args, kwargs, output):
            log_probs = seams.fused_log_probs(kwargs, output)  # (B, T-1), zero where the label is -100
            if log_probs is None:
                return None
            # Row of each position: the batch row, or (padding-free) the packed sequence the position belongs to
            owner = seq_idx[:, 1:].long() if seq_idx is not None else None
            w = self._ica_weights(index, log_probs, units=units, rows=rows)
            output.log_probs = log_probs * (w[owner] if owner is not None else w[:, None])
            mask = keep() if keep is not None else None
            if mask is not None:
                output.log_probs = output.log_probs * mask.to(log_probs.dtype)
            fired.append(output.log_probs)
            return output

        handle = model.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
