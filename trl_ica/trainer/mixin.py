"""What every ICA trainer adds to its TRL parent: the example index, the controller, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .. import seams
from ..data_io import read_scores_file
from ..scoring.demonstrations import NEAREST_SELECTIONS
from ..scoring.formats import PreferenceExample, read_row
from ..scoring.ica import prepare_holdout_reference, prepare_ica
from ..scoring.scorer import ScoringModel, load_scoring_model, model_dtype
from ..scoring.streamed import prepare_streamed_ica
from ..scoring.weighting import BATCH_WEIGHTINGS
from .controller import ICAController
from .ica_args import ICAArguments, check_fixed_scorer, scoring_options, training_options
from .model_card import ICA_PAPER, base_model_name, complete_card
from .sampling import WeightedEpochSampler, steps_per_epoch

logger = logging.getLogger(__name__)

INDEX = "ica_index"
ROW = "ica_row"  # a streamed row as ICA scores it (JSON), carried through TRL's preparation to the collator
ROWS = "ica_rows"  # a batch's streamed rows, one mapping per `ica_index`
#: The columns of a row in a format SFTTrainer trains on that ICA reads (see `formats.read_row`).
ROW_COLUMNS = (
    "prompt",
    "completion",
    "messages",
    "conversations",
    "text",
    "chosen",
    "rejected",
    "tools",
    "chat_template_kwargs",
)


def streamed_row_view(row, formatting_func=None, text_field: str = "text") -> dict:
    """One streamed row as ICA scores it, the way [`scoring_view`] maps a whole dataset: `formatting_func(row)` or
    the `text_field` column as language modeling, else the row's prompt/completion, `messages`, `text` or preference
    pair, with its `tools`."""
    if formatting_func is not None:
        return {"text": formatting_func(row)}
    if "input_ids" in row:
        raise ValueError("Pre-tokenised rows in a streamed `train_dataset` are not supported by ICA; use a Dataset.")
    if text_field != "text" and text_field in row and not set(ROW_COLUMNS) & set(row):
        return {"text": row[text_field]}
    return {k: row[k] for k in ROW_COLUMNS if k in row}


def scoring_view(
    dataset, formatting_func=None, text_field: str = "text", name: str = "train_dataset", completion_only_loss=False
):
    """The rows ICA scores, as SFTTrainer will train on them: with a `formatting_func`, a language-modeling row
    `{"text": formatting_func(row)}` per row (TRL applies it the same way); a language-modeling dataset whose text is
    in `text_field` (`SFTConfig.dataset_text_field`) read from there; pre-tokenised rows as `input_ids` with the
    `labels` or `loss_mask` TRL's label rule gives them ([`seams.sft_loss_mask_columns`]); otherwise `dataset`."""
    if not isinstance(dataset, (Dataset, list)):
        return dataset  # refused by the readers, with what is allowed
    columns = set(dataset.column_names if isinstance(dataset, Dataset) else dataset[0] if dataset else ())
    if "input_ids" in columns and formatting_func is None:  # TRL ignores a formatting_func on tokenised rows
        masks = seams.sft_loss_mask_columns(columns, bool(completion_only_loss))
        ids = [r["input_ids"] for r in dataset]
        if masks is None:
            return Dataset.from_dict({"input_ids": ids, "labels": [r["labels"] for r in dataset]})
        loss_mask = [
            [int(all(bits)) for bits in zip(*(r[c] for c in masks))] if masks else [1] * len(r["input_ids"])
            for r in dataset
        ]
        return Dataset.from_dict({"input_ids": ids, "loss_mask": loss_mask})
    if formatting_func is not None:
        texts = []
        for i, row in enumerate(dataset):
            text = formatting_func(row)
            if not isinstance(text, str):
                raise ValueError(
                    f"`formatting_func` must return one string per row, as SFTTrainer applies it; {name} row {i} "
                    f"gave {type(text).__name__}."
                )
            texts.append(text)
        return Dataset.from_dict({"text": texts})
    other = {"prompt", "completion", "messages", "conversations", "chosen", "rejected", "text"}
    if text_field != "text" and text_field in columns and not other & columns:
        return Dataset.from_dict({"text": [row[text_field] for row in dataset]})
    return dataset


def add_index(dataset, trainer: str, pairs: bool, name: str = "train_dataset", view=None, row_view=None) -> Dataset:
    """`dataset` with an `ica_index` column (0..N-1): the stable id of each row, since TRL may drop rows. Its first
    row (as `view` gives the rows ICA scores) must be of the kind `trainer` trains on (preference pairs when
    `pairs`), so a wrong dataset is refused before TRL meets it.

    A streamed dataset (`IterableDataset`) is indexed in stream order and each row also carries, as `ica_row`, what
    `row_view(row)` gives ICA to score (trainers without `row_view` refuse streams)."""
    if dataset is None:
        raise ValueError(f"`{name}` is required: ICA weights the training examples.")
    if isinstance(dataset, IterableDataset):
        if row_view is None:
            raise ValueError(f"{trainer} does not train on a streamed `{name}` (an IterableDataset); use a Dataset.")
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"`{name}` is empty.")
        if INDEX in first or ROW in first:
            raise ValueError(f"`{name}` already has a column named {INDEX!r} or {ROW!r}, which ICA trainers reserve.")
        if isinstance(read_row(row_view(first), 0, name), PreferenceExample) != pairs:
            wanted, got = ("preference pairs", "single responses") if pairs else ("single responses", "pairs")
            raise ValueError(f"`{name}` streams {got}, but {trainer} trains on {wanted}.")
        return dataset.map(lambda row, i: {INDEX: i, ROW: json.dumps(row_view(row))}, with_indices=True)
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"`{name}` must be a `datasets.Dataset` (ICA scores every row up front), got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty.")
    if INDEX in dataset.column_names:
        raise ValueError(f"`{name}` already has a column named {INDEX!r}, which ICA trainers reserve; rename it.")
    if not {"input_ids", "prompt_ids"} & set(dataset.column_names):  # pre-tokenised rows are refused later
        first = read_row((view(dataset.select([0])) if view else dataset)[0], 0, name)
        if isinstance(first, PreferenceExample) != pairs:
            wanted, got = ("preference pairs", "single responses") if pairs else ("single responses", "pairs")
            other = "ICASFTTrainer" if pairs else "ICADPOTrainer or ICACPOTrainer"
            raise ValueError(
                f"`{name}` has {got} (columns {dataset.column_names}), but {trainer} trains on {wanted}"
                f"{' (`prompt`, `chosen`, `rejected`)' if pairs else ''}; use {other} for this data."
            )
    return dataset.add_column(INDEX, list(range(len(dataset))))


def ica_args(args, model, config_class, name: str):
    """`args` as a `config_class`: None gives one named after the model; a stock TRL config (or `TrainingArguments`)
    is carried over field by field, with the ICA defaults for the `ica_*` fields it lacks."""
    if args is None:
        model_name = model if isinstance(model, str) else seams.loaded_from(model.config)
        return config_class(f"{model_name.split('/')[-1]}-{name}")
    if isinstance(args, config_class):
        return args
    if (
        isinstance(args, ICAArguments)
        or not isinstance(args, TrainingArguments)
        or not issubclass(config_class, type(args))
    ):
        raise TypeError(
            f"`args` must be an {config_class.__name__}, or a config it extends, got {type(args).__name__}."
        )
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    logger.info("`args` is a %s: using it as an %s with the ICA defaults.", type(args).__name__, config_class.__name__)
    return config_class(**values)


class IndexedCollator:
    """Wraps a TRL collator: takes `ica_index` off each example before collation and returns it as a tensor with one
    entry per sequence, in the order of the batch's rows (or of `seq_idx` in packed and padding-free batches); a
    streamed row's `ica_row` becomes the batch's `ica_rows`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        if not examples or INDEX not in examples[0]:
            return self.collator(examples)
        rows = [json.loads(e[ROW]) for e in examples] if ROW in examples[0] else None
        examples = [{k: v for k, v in e.items() if k != ROW} for e in examples]
        # a packed row carries the index of each sequence in it, in order (see `ICASFTTrainer._prepare_dataset`)
        ids = [i for e in examples for i in (e[INDEX] if isinstance(e[INDEX], list) else [e[INDEX]])]
        index = torch.tensor(ids, dtype=torch.long)
        batch = self.collator([{k: v for k, v in e.items() if k != INDEX} for e in examples])
        batch[INDEX] = index
        if rows is not None:
            batch[ROWS] = rows
        return batch


def _context_size(model, fallback: int | None) -> int | None:
    """The model's context size (`max_position_embeddings`), else `fallback`."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or fallback


def loss_reaches(loss: torch.Tensor, weighted: torch.Tensor, depth: int = 64) -> bool:
    """Whether `loss` was computed from `weighted`: its autograd node is within `depth` steps of the loss's. The
    reductions between the weighted tensor and TRL's loss are a handful of steps; a loss computed elsewhere (inside
    the model's forward, from an unweighted copy) does not reach it. True when nothing needs gradients."""
    if not (loss.requires_grad and weighted.requires_grad) or weighted.grad_fn is None:
        return True
    target, frontier, seen = weighted.grad_fn, [loss.grad_fn], set()
    for _ in range(depth):
        following = []
        for node in frontier:
            if node is None or node in seen:
                continue
            if node is target:
                return True
            seen.add(node)
            following.extend(next_node for next_node, _ in node.next_functions)
        if not following:
            return False
        frontier = following
    return False


def training_compute_dtype(args) -> torch.dtype | None:
    """The dtype training computes in under mixed precision (accelerate autocasts `model.forward` to it), which
    scoring uses too; None without mixed precision (the weights' own dtype)."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


class ICATrainerMixin:
    """Shared by the ICA trainers; the subclass applies the weights where its parent reduces the loss."""

    _paper = ICA_PAPER  # the paper TRL's model card names and cites; the parent method's is added below it
    _ica_pairs = False  # trains on preference pairs (DPO, CPO) rather than single responses

    def _ica_parent(self) -> tuple[str, dict]:
        """The parent TRL method's name and paper (`_name`, `_paper` of the first TRL class in the MRO)."""
        for cls in type(self).__mro__:
            if "_paper" in vars(cls) and vars(cls)["_paper"] is not ICA_PAPER:
                return vars(cls).get("_name", cls.__name__), vars(cls)["_paper"]
        return "", {}

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, naming the ICA method and citing ICA, with the real base model (the Hub id the embedded
        default came from), the `ica_*` settings, the parent method's citation and the files under `ica/`."""
        base_model = base_model_name(self.model.config)
        with seams.reported_as(self.model.config, base_model):
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        self._complete_card(self.args.output_dir, base_model)

    def _complete_card(self, folder: str, base_model: str | None) -> None:
        path = os.path.join(folder, "README.md")
        if self.is_world_process_zero() and os.path.isfile(path):
            parent, paper = self._ica_parent()
            complete_card(
                path,
                method=self._name,
                parent=parent,
                parent_paper=paper,
                base_model=base_model,
                options=self._ica.builder.options,
                args=self.args,
                scorer=self._ica.scorer_name,
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """`Trainer.save_model`; PEFT's `save_pretrained` rewrites the card's base model to the folder the model was
        loaded from, so the card is completed again afterwards."""
        super().save_model(output_dir, _internal_call)
        self._complete_card(output_dir or self.args.output_dir, base_model_name(self.model.config))

    def _ica_setup(
        self, raw_train: Dataset, holdout_dataset, max_length: int | None, view=None, scoring=(None, None)
    ) -> None:
        """Build the controller. `view` maps a dataset to the rows ICA scores (see [`scoring_view`]); by default the
        rows themselves. `scoring` is the constructor's `(scoring_model, scoring_processing_class)`."""
        args: ICAArguments = self.args
        enabled = getattr(self, "is_fsdp_enabled", False)
        fsdp = getattr(self.accelerator.state, "fsdp_plugin", None) if enabled else None
        version = getattr(fsdp, "fsdp_version", 1)
        if fsdp is not None and version != 2:
            raise ValueError(
                f"ICA scoring runs under FSDP2 only, but this run uses FSDP version {version} (TRL's `fsdp1` "
                "configuration): the engine calls the backbone and the LM head directly, and under FSDP1 the "
                "parameters the root module flattens (embeddings, final norm, LM head) are gathered only by the "
                "root's own forward. Launch with FSDP2 (`fsdp_version: 2`, TRL's `fsdp2` configuration) or "
                "DeepSpeed ZeRO-3."
            )
        view = view or (lambda dataset, name: dataset)
        self.data_collator = IndexedCollator(self.data_collator)
        if holdout_dataset is None:
            raise ValueError("`holdout_dataset` is required: ICA scores examples against a clean holdout set.")
        holdout_dataset = view(holdout_dataset, "holdout_dataset")
        streamed = isinstance(raw_train, IterableDataset)
        train_rows = None if streamed else view(raw_train.remove_columns(INDEX), "train_dataset")
        scorer = self._scoring_model(*scoring, rows=train_rows)
        # The model and tokenizer that score: a scoring model of its own renders rows with its own chat template
        model, tokenizer = (scorer.model, scorer.tokenizer) if scorer else (self.model, self.processing_class)
        # What defines the score, built once: the same for the training rows and the holdout's own scores
        chat_template = None if scorer else seams.training_chat_template(self)
        score_options = scoring_options(args, chat_template=chat_template)
        options = dict(
            # Scoring sequences carry k demonstrations on top of the training row: they are bounded by the model's
            # context (or `ica_max_length`), not by the training `max_length`.
            max_length=args.ica_max_length or _context_size(model, max_length),
            max_length_argument="ica_max_length",
            show_progress=self.accelerator.is_main_process and not args.disable_tqdm,
            compute_dtype=training_compute_dtype(args),
            # kNN on the model's own embeddings waits for the first step under FSDP or DeepSpeed, which place and
            # shard the model only then: run now, it would embed every row on the CPU
            defer_demos=bool(
                scorer is None
                and (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))
                and args.ica_demo_selection in NEAREST_SELECTIONS
                and args.ica_embedding_model is None
            ),
        )
        if train_rows is None:
            self._check_streamed(args, "preference" if self._ica_pairs else "sft")
        if args.ica_weight_mode_reason is not None:
            logger.warning(args.ica_weight_mode_reason)
        if train_rows is None:
            streamed = {k: options[k] for k in ("max_length", "max_length_argument", "compute_dtype")}
            builder = prepare_streamed_ica(
                model, tokenizer, holdout_dataset, score_options, pairs=self._ica_pairs, **streamed
            )
        else:
            builder = prepare_ica(model, tokenizer, train_rows, holdout_dataset, score_options, **options)
        score_options = builder.options  # `ica_score_span="auto"` decided for these rows
        reference = None
        token_masks = getattr(args, "ica_token_quantile", None) is not None
        trained_tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        scoring_tokenizer = None if scorer is None else getattr(scorer.tokenizer, "tokenizer", scorer.tokenizer)
        if token_masks and scorer is not None and scoring_tokenizer.get_vocab() != trained_tokenizer.get_vocab():
            raise ValueError(
                f"`ica_token_quantile` masks the training tokens by the scoring model's tokens, but the scoring model "
                f"{scorer.name} has another vocabulary than the trained model's tokenizer. Score with a model of the "
                "same tokenizer, or unset `ica_token_quantile`."
            )
        if args.ica_weighting in ("holdout_quantile", "holdout_posterior") or token_masks:
            reference = prepare_holdout_reference(
                model, tokenizer, holdout_dataset, score_options, pairs=builder.pairs, **options
            )
            if args.ica_weighting == "holdout_quantile" and len(reference.candidates) < 10:
                logger.warning(
                    "ica_weighting=%r with a holdout of %d rows: weights take only %d distinct values "
                    "(the share of the holdout's scores each example beats).",
                    args.ica_weighting,
                    len(reference.candidates),
                    2 * len(reference.candidates) + 1,
                )
        self._ica = ICAController(
            builder,
            training_options(args),
            args.output_dir,
            self.accelerator.is_main_process,
            reference_builder=reference,
            compute_dtype=training_compute_dtype(args),
            scorer=scorer,
        )
        if args.ica_scores_file is not None:
            expected = {"method": "ica", **score_options.comparable()}
            if scorer is not None:  # the file must come from the same scoring model
                expected["model"] = scorer.name
            scores = read_scores_file(args.ica_scores_file, raw_train.remove_columns(INDEX), expected)
            self._ica.use_scores(scores, f"ica_scores_file={args.ica_scores_file}")
        per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps
        step_batch = per_process * self.accelerator.num_processes
        if args.ica_weighting in BATCH_WEIGHTINGS and step_batch == 1:
            raise ValueError(
                f"`ica_weighting={args.ica_weighting!r}` compares the scores of the examples of one optimizer step, "
                "but each step trains on a single example (per_device_train_batch_size=1 x "
                "gradient_accumulation_steps=1 x 1 process), so every weight would be 1. Raise "
                "`gradient_accumulation_steps` (or `per_device_train_batch_size`), or use a scheme that weights each "
                "example on its own: `ica_weighting='holdout_quantile'` (against the holdout's own scores) or "
                "'global_minmax' (against the range of the training set's scores)."
            )
        if args.ica_loss_reduction == "weighted_mean" and step_batch == 1:
            raise ValueError(
                "`ica_loss_reduction='weighted_mean'` divides a step's weighted loss by its weights, so a step of a "
                "single example (per_device_train_batch_size=1 x gradient_accumulation_steps=1 x 1 process) would "
                "train unweighted. Raise `gradient_accumulation_steps`, or use `ica_loss_reduction='token_mean'`."
            )

    def _scoring_model(self, model, tokenizer, rows=None) -> ScoringModel | None:
        """The scoring model of the run: the constructor's `scoring_model`, else `ica_scoring_model` loaded in the
        training precision (or the trained model's dtype) on the training device; None to score with the trained
        model. `rows` (the training rows ICA reads) must be text: token ids are the trained model's tokenizer's."""
        args = self.args
        if model is None and tokenizer is not None:
            raise ValueError("`scoring_processing_class` is the tokenizer of `scoring_model`, which is not given.")
        if model is not None and args.ica_scoring_model is not None:
            raise ValueError(
                f"Give the scoring model once: `scoring_model` or `ica_scoring_model`={args.ica_scoring_model!r}."
            )
        model = model if model is not None else args.ica_scoring_model
        if model is None:
            return None
        check_fixed_scorer(model, args.ica_refresh)
        if isinstance(rows, Dataset) and "input_ids" in rows.column_names:
            raise ValueError(
                "A scoring model of its own renders the rows with its own tokenizer, but `train_dataset` is "
                "pre-tokenised (`input_ids`) with the trained model's. Pass text rows, or score with the trained "
                "model."
            )
        dtype = training_compute_dtype(args) or model_dtype(self.model)
        scorer = load_scoring_model(
            model,
            tokenizer,
            dtype=dtype,
            device=self.accelerator.device,
            trust_remote_code=getattr(args, "trust_remote_code", False),
        )
        logger.info("ICA scores with %s, not with the model being trained.", scorer.name)
        return scorer

    @staticmethod
    def _check_streamed(args, kind: str) -> None:
        """What a streamed training set allows: each row scored as it arrives (`ica_refresh=1`, the default, means
        that on a stream, as `"online"` does; R > 1 scorings of the whole set need every row up front), no given
        scores, no packing."""
        if args.ica_scores_file is not None:
            raise ValueError("`ica_scores_file` scores a Dataset's rows; a streamed `train_dataset` has none fixed.")
        # a preset's sampling becomes loss weights on a stream (which has no sampler); sampling set by the user is
        # refused
        args.validate_ica(kind, streamed=True)
        if getattr(args, "packing", False):
            raise ValueError("ICA weighting of packed rows needs a Dataset: set `packing=False` or pass a Dataset.")
        if args.ica_refresh == 1:
            logger.info(
                "A streamed `train_dataset`: each row is scored once, as it arrives, by the model of its step "
                "(ica_refresh=1 on a stream is ica_refresh='online')."
            )
            args.ica_refresh = "online"
            # what online scoring refuses (pool weightings, token masks) is refused here
            args.validate_ica(kind, streamed=True)
        if args.ica_refresh != "online":
            raise ValueError(
                f"A streamed `train_dataset` (an IterableDataset) is scored step by step as its rows arrive, but "
                f"`ica_refresh`={args.ica_refresh!r} rescores every row that many times. Use `ica_refresh=1` (the "
                "default: each row scored once, as it arrives) or 'online', or pass a Dataset."
            )

    @property
    def ica(self) -> ICAController:
        """The run's [`ICAController`]: its `state` (current scores, refreshes done), its `builder` (the requests and
        demonstrations of each example), its `recorder` (the `ica/` files)."""
        return self._ica

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        seams.add_signature_column(self, INDEX)
        seams.add_signature_column(self, ROW)

    def _get_train_sampler(self, train_dataset=None):
        """The stock sampler, or under `ica_weight_mode="sampling"` a [`WeightedEpochSampler`] that draws each epoch's
        rows by their ICA weights, seeded as the stock sampler is (`data_seed`, else the run's seed)."""
        if not self._ica.sampling:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        index = dataset[INDEX]
        if index and isinstance(index[0], list):
            raise ValueError(
                "`ica_weight_mode='sampling'` draws examples, but the training rows are packed sequences "
                "of several (`packing=True`); set `packing=False`."
            )
        index = np.asarray(index, dtype=np.int64)
        args = self.args
        processes = self.accelerator.num_processes
        step_rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes

        def weights():
            pool, version = self._ica.pool_weights()
            return pool[index], version

        def before_step(step: int) -> None:
            self._ica.before_sampled_step(self.model, step, self.state.max_steps)
            self._log_ica_records()

        # the stock sampler's seed: accelerate seeds its `SeedableRandomSampler` with `data_seed`, else the seed the
        # run set (torch's initial seed when the dataloader is prepared, which is now)
        seed = args.data_seed if args.data_seed is not None else torch.random.initial_seed()
        per_epoch = steps_per_epoch(
            len(index),
            args.per_device_train_batch_size,
            processes,
            args.gradient_accumulation_steps,
            args.dataloader_drop_last,
        )
        return WeightedEpochSampler(
            len(index), weights, seed, step_rows, before_step, per_epoch, version=self._ica.weights_version
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """`Trainer.get_batch_samples`, which fetches every micro-batch of an optimizer step before the first one
        runs; the ICA weights of the whole step are computed here ([`ICAController.begin_step`])."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        indexed = [b for b in batch_samples if isinstance(b, dict) and INDEX in b]
        micro_batches = [b[INDEX].cpu().numpy() for b in indexed]
        units = [self._loss_units(b) for b in indexed]
        rows = [b.pop(ROWS) for b in indexed] if indexed and ROWS in indexed[0] else None
        self._ica.begin_step(self.model, micro_batches, self.state.global_step, self.state.max_steps, units, rows)
        self._log_ica_records()
        return batch_samples, num_items_in_batch

    def _loss_units(self, batch: dict) -> np.ndarray:
        """What each example of a collated micro-batch counts for in the trainer's loss divisor (one entry per
        `ica_index`): 1 per pair here; SFT counts loss tokens. `ica_loss_reduction="weighted_mean"` divides by the
        weighted sum of these."""
        return np.ones(len(batch[INDEX]))

    def training_step(self, *args, **kwargs):
        if self._ica.step_begun != self.state.global_step:
            raise seams.SeamError(
                "`Trainer.get_batch_samples` fetching every micro-batch of an optimizer step before it runs "
                "(transformers.trainer), which ICA trainers use to weight the examples of a step together",
                "a training step ran without it",
            )
        return super().training_step(*args, **kwargs)

    def _ica_weights(self, index: np.ndarray, like: torch.Tensor, dtype=None, units=None, rows=None) -> torch.Tensor:
        """This micro-batch's weights as a tensor on `like`'s device (`like`'s dtype unless `dtype` is given): the
        one path from the controller's weights to the tensor the loss is multiplied by, in every trainer. `units`
        are the micro-batch's [`_loss_units`] (and `rows`, its streamed rows), used when it is a step of its own (a
        `compute_loss` outside `train()`)."""
        weights = self._ica.micro_batch_weights(
            self.model, index, self.state.global_step, self.state.max_steps, units, rows
        )
        self._log_ica_records()
        return torch.as_tensor(weights, dtype=dtype or like.dtype, device=like.device)

    def unweighted_error(self, seam: str) -> seams.SeamError:
        """The error for a training step whose loss the ICA weights did not reach: `seam` names the TRL code the
        trainer relies on. Training on would silently be unweighted, so the step stops instead."""
        return seams.SeamError(
            seam, "the ICA weights did not reach the loss of this training step, which would go on unweighted"
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The parent's `log`; in training, the scores and weights of the steps since the last log also go to the
        trackers that take histograms."""
        histograms = self._ica.recorder.take_step_histograms()
        if histograms:
            self._log_histograms(histograms)
        super().log(logs, *args, **kwargs)

    def _log_ica_records(self) -> None:
        """The `ica/*` metrics of the steps weighted since the last call into the trainer's metric store, and the
        histogram of each scoring of the training set to the trackers."""
        for metrics in self._ica.recorder.take_metrics():
            self._log_ica(metrics)
        for values in self._ica.recorder.take_scoring_histograms():
            self._log_histograms(values)

    def _log_histograms(self, values: dict[str, np.ndarray]) -> None:
        """Histograms at the current step to the trackers that take them: TensorBoard (`add_histogram`) and W&B
        (`wandb.Histogram`); the others get the `ica/*` scalars only."""
        tensorboard, wandb_modules = seams.histogram_writers(self)
        for writer in tensorboard:
            for tag, array in values.items():
                writer.add_histogram(tag, np.asarray(array, dtype=np.float64), self.state.global_step)
        for wandb in wandb_modules:
            wandb.log({tag: wandb.Histogram(np.asarray(a)) for tag, a in values.items()}, commit=False)

    def _log_ica(self, metrics: dict[str, float]) -> None:
        store = seams.train_metrics(self)
        for key, value in metrics.items():
            store[key].append(value)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, str):
            self._ica.resume(folder)
        self._ica.start_files()
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.accelerator.is_main_process:
            from ..plots import save_training_plots

            save_training_plots(self._ica.recorder.dir)
        # Training ends with an all-gather (`Trainer.store_flos`). Under gloo (CPU processes) its worker thread
        # releases the gathered tensors a moment later and needs the GIL for that; a process that frees its DDP
        # model first holds the GIL in the process group's destructor, which joins that thread: both wait forever.
        # The barrier releases the GIL while the other processes finish, so the tensors are released first.
        self.accelerator.wait_for_everyone()
        return result

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self._ica.save(seams.checkpoint_folder(self, trial), self.state.global_step)
