"""`trl-ica` command line: `demo`, `score` (every row with its score), `select` (a subset by score), `data` (the
noisy GSM8K files the recipes train on) and `sft`/`dpo`/`simpo` (the training scripts, see `trl_ica.cli.launch`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SCORE_COLUMN = "score"


def _score_parser(parser: argparse.ArgumentParser) -> None:
    from ..presets import PRESETS
    from ..scoring.demonstrations import DEMO_SELECTIONS
    from ..scoring.options import FORMS, REDUCTIONS
    from ..scoring.rendering import DEMO_LAYOUTS
    from ..selection.baselines import METHODS
    from ..selection.metrics import METRICS

    parser.add_argument("--method", required=True, choices=list(METHODS), help="Scoring method.")
    parser.add_argument("--model", required=True, help="Model to score with: Hub id, local path, or the default.")
    parser.add_argument("--dataset", required=True, help="Local .json/.jsonl/.parquet file or Hub dataset name.")
    parser.add_argument("--holdout", help="Clean holdout set (file or Hub name); needed by ica and oneshot.")
    parser.add_argument("--reference-model", help="For rho: a model fine-tuned on the holdout set.")
    parser.add_argument("--split", default="train", help="Split of a Hub dataset.")
    parser.add_argument("--output", required=True, help="Scored rows: .jsonl, .json (one array) or .parquet.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    parser.add_argument(
        "--num-demos", type=int, help="k demos (ica, default 3), holdout queries (oneshot, 3), n_d (whisperer, 10)."
    )
    parser.add_argument("--demo-selection", default="knn", choices=list(DEMO_SELECTIONS))
    parser.add_argument(
        "--preset",
        default="recommended",
        choices=list(PRESETS),
        help="ica: where --form, --reduction, --demo-layout and --score-end-token come from when not given: the "
        "measured best (conditioned, mean, turns, true) or the paper's (difference, sum, in_turn, false).",
    )
    parser.add_argument("--reduction", choices=list(REDUCTIONS), help="ica: sum or per-token mean (default: preset).")
    parser.add_argument(
        "--form",
        choices=list(FORMS),
        help="ica: the paper's difference, or log p(y | demos, x) alone (noisy labels; use with --reduction mean).",
    )
    parser.add_argument(
        "--demo-layout",
        choices=list(DEMO_LAYOUTS),
        help="ica, conversational rows: demos as earlier user/assistant turns, or in the user turn (the paper's).",
    )
    parser.add_argument(
        "--score-end-token",
        choices=["true", "false"],
        help="ica: score the end-of-turn (or EOS) token after each response, as TRL trains it.",
    )
    parser.add_argument(
        "--score-span",
        help="ica: score only this span of each response, the rest as context: 'last_line', or a regular expression "
        "whose last match is the span (e.g. '#### .*' for GSM8K's final answer), a response without it scoring -inf; "
        "'response': the whole response; 'auto': the last line where every row allows a span, else the whole "
        "response (default: preset).",
    )
    parser.add_argument(
        "--assistant-only-loss",
        action="store_true",
        help="ica: of a response of several messages or tool calls, score only the assistant turns' tokens, as "
        "training with TRL's `assistant_only_loss=True` covers them (the chat template needs `{% generation %}`).",
    )
    parser.add_argument("--embedding-model", help="sentence-transformers encoder for kNN.")
    parser.add_argument("--label-column", help="Column to split the histogram by (default: none).")
    parser.add_argument("--batch-size", type=int, help="Most sequences per forward.")
    parser.add_argument(
        "--scoring-max-tokens",
        type=int,
        help="Token positions per scoring forward, each sequence's demonstration prefix included (default: 16384 on "
        "an accelerator, 2048 on the CPU).",
    )
    parser.add_argument(
        "--scoring-sharing",
        default="auto",
        choices=["auto", "tree", "flat", "none"],
        help="ica: how demonstration prefixes share their KV cache (default: the cheapest by the cost model).",
    )
    parser.add_argument(
        "--forward-overhead",
        help="ica: the cost model's fixed cost per forward in tokens, or 'measure' (default: 32 on the CPU, 256 on "
        "an accelerator; raise it under QLoRA, ZeRO-3 or FSDP, where every forward dequantises or gathers weights).",
    )
    parser.add_argument("--seed", type=int, default=0)
    whisperer = parser.add_argument_group("whisperer")
    whisperer.add_argument("--metric", default="exact_match", choices=list(METRICS))
    whisperer.add_argument("--num-queries", type=int, default=5, help="Questions answered per prompt (n_q).")
    whisperer.add_argument("--min-demo-count", type=int, default=1, help="Times every row is a demonstration.")
    whisperer.add_argument("--layer", type=int, help="Decoder layer whose attention is read (default: the middle).")
    whisperer.add_argument("--max-new-tokens", type=int, help="Generation budget per prompt.")


def _select_parser(parser: argparse.ArgumentParser) -> None:
    from ..selection.baselines import SELECT_MODES

    parser.add_argument("--scores", required=True, help="Output of `trl-ica score` (.jsonl, .json or .parquet).")
    parser.add_argument("--output", required=True, help="Selected rows: .jsonl, .json (one array) or .parquet.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    parser.add_argument("--ratio", type=float, help="Share of rows to keep, in (0, 1].")
    parser.add_argument("--mode", default="top", choices=list(SELECT_MODES))
    parser.add_argument("--threshold", type=float, help="With --mode threshold: keep rows scoring at least this.")
    parser.add_argument("--keep-score", action="store_true", help="Keep the score column in the output.")


def fill_from_preset(args) -> None:
    """Set the score flags left out (`--form`, `--reduction`, `--demo-layout`, `--score-end-token`, `--score-span`)
    from `--preset`."""
    from ..presets import scoring_settings

    preset = scoring_settings(args.preset)
    flags = {
        "form": "ica_score_form",
        "reduction": "ica_reduction",
        "demo_layout": "ica_demo_layout",
        "score_span": "ica_score_span",
    }
    for flag, field in flags.items():
        if getattr(args, flag) is None:
            setattr(args, flag, preset[field])
    if args.score_end_token is None:
        args.score_end_token = "true" if preset["ica_score_end_token"] else "false"


def scoring_options(args):
    """The [`ICAScoringOptions`] of `trl-ica score`'s flags (after [`fill_from_preset`])."""
    from ..scoring.options import ICAScoringOptions

    return ICAScoringOptions(
        num_demos=3 if args.num_demos is None else args.num_demos,
        demo_selection=args.demo_selection,
        form=args.form,
        reduction=args.reduction,
        layout=args.demo_layout,
        score_end=args.score_end_token == "true",
        embedding_model=args.embedding_model,
        seed=args.seed,
        span=args.score_span,
        assistant_only=args.assistant_only_loss,
    )


def score_settings(args, options) -> dict:
    """What a scores file was computed with, the score's settings (`options`, resolved for the rows) as a trainer's
    `ica_*` fields name them (see `ica_scores_file`)."""
    settings = {"method": args.method, "model": args.model, "dataset": args.dataset, "holdout": args.holdout}
    if args.method == "ica":
        settings.update(options.record())
    return settings


def run_score(args) -> dict:
    import numpy as np
    import torch
    from accelerate import PartialState

    from ..data_io import check_output, load_rows, scores_meta_path, write_json, write_rows
    from ..embedded import load_model
    from ..plots import plot_score_histogram
    from ..scoring.ica import resolve_options
    from ..selection.baselines import score_dataset
    from ..selection.whisperer import WhispererConfig, whisperer_scores

    fill_from_preset(args)
    options = scoring_options(args)
    inputs = {"--dataset": args.dataset, "--holdout": args.holdout}
    check_output(args.output, inputs, args.overwrite)
    check_output(scores_meta_path(args.output), inputs, overwrite=True, argument="--output's settings file")
    dataset = load_rows(args.dataset, args.split, "--dataset")
    if SCORE_COLUMN in dataset.column_names:
        raise ValueError(f"`--dataset` already has a {SCORE_COLUMN!r} column; rename it so it is not overwritten.")
    if args.label_column and args.label_column not in dataset.column_names:
        raise ValueError(
            f"`--label-column`={args.label_column!r} is not a column of the dataset ({dataset.column_names})."
        )
    holdout = load_rows(args.holdout, args.split, "--holdout") if args.holdout else None
    for flag, value in (("--batch-size", args.batch_size), ("--scoring-max-tokens", args.scoring_max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"`{flag}` must be a positive integer, got {value}.")
    overhead = forward_overhead(args.forward_overhead)

    # Under `accelerate launch` this joins the process group (gloo on a CPU-only machine): ICA and the
    # log-probability baselines then split the rows between the processes; the main process writes the outputs.
    state = PartialState(cpu=not torch.accelerator.is_available())
    model, tokenizer = (None, None) if args.method == "random" else load_model(args.model)
    reference = load_model(args.reference_model)[0] if args.reference_model else None
    for m in (model, reference):
        if m is not None:
            m.to(state.device)
    if args.method == "ica" and holdout is not None:  # `auto` decided for these rows, as the settings file records
        options = resolve_options(options, tokenizer, dataset, holdout)
    extra = {}
    start = time.perf_counter()
    if args.method == "whisperer":
        config = WhispererConfig(
            num_demos=10 if args.num_demos is None else args.num_demos,
            num_queries=args.num_queries,
            min_demo_count=args.min_demo_count,
            metric=args.metric,
            layer=args.layer,
            max_new_tokens=args.max_new_tokens,
            batch_size=8 if args.batch_size is None else args.batch_size,
            seed=args.seed,
        )
        result = whisperer_scores(model, tokenizer, dataset, holdout, config)
        scores, extra = result.scores, result.summary()
    else:
        scores = score_dataset(
            args.method,
            model,
            tokenizer,
            dataset,
            holdout,
            options,
            reference_model=reference,
            batch_size=args.batch_size,
            max_batch_tokens=args.scoring_max_tokens,
            sharing=args.scoring_sharing,
            forward_overhead=overhead,
        )
    seconds = time.perf_counter() - start
    plot = os.path.splitext(args.output)[0] + ".png"
    if state.is_main_process:
        meta = scores_meta_path(args.output)  # read back by a trainer's ica_scores_file
        if os.path.exists(meta):  # never beside rows it does not describe, should the run stop between the two
            os.remove(meta)
        write_rows(dataset.add_column(SCORE_COLUMN, [float(s) for s in scores]), args.output)
        write_json(score_settings(args, options), meta)
        labels = np.asarray(dataset[args.label_column]).astype(str) if args.label_column else None
        plot = plot_score_histogram(scores, plot, labels=labels, title=f"{args.method} scores")
    summary = {
        "rows": len(scores),
        "method": args.method,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "output": args.output,
        "histogram": plot,
        "seconds": round(seconds, 3),
        "rows_per_second": round(len(scores) / seconds, 2) if seconds > 0 else None,
        **extra,
    }
    if state.is_main_process:
        print(json.dumps(summary))
    state.wait_for_everyone()
    return summary


def run_select(args) -> dict:
    from ..data_io import check_output, load_rows, write_rows
    from ..selection.baselines import select_top

    check_output(args.output, {"--scores": args.scores}, args.overwrite)
    scored = load_rows(args.scores, argument="--scores")
    if SCORE_COLUMN not in scored.column_names:
        raise ValueError(f"`--scores` {args.scores!r} has no {SCORE_COLUMN!r} column; make it with `trl-ica score`.")
    # null: a response without the span `--score-span` scored (JSON has no -inf), ranked below every score
    values = [float("-inf") if v is None else v for v in scored[SCORE_COLUMN]]
    keep = select_top(values, args.ratio, mode=args.mode, threshold=args.threshold)
    subset = scored.select(keep)
    if not args.keep_score:
        subset = subset.remove_columns(SCORE_COLUMN)
    write_rows(subset, args.output)
    summary = {"rows": len(scored), "selected": len(keep), "mode": args.mode, "output": args.output}
    print(json.dumps(summary))
    return summary


def run_data(args) -> dict:
    from ..data_io import write_rows
    from .scenarios import noisy_gsm8k, noisy_gsm8k_pairs

    os.makedirs(args.output, exist_ok=True)
    train, holdout, test = noisy_gsm8k(args.n_train, args.n_holdout, args.n_test, noise=args.noise, seed=args.seed)
    pairs, pair_holdout, pair_test = noisy_gsm8k_pairs(
        args.n_train, args.n_holdout, args.n_test, flip=args.noise, seed=args.seed
    )
    files = {
        "train": train,
        "holdout": holdout,
        "test": test,
        "train_pairs": pairs,
        "holdout_pairs": pair_holdout,
        "test_pairs": pair_test,
    }
    summary = {}
    for name, rows in files.items():
        path = os.path.join(args.output, f"{name}.jsonl")
        write_rows(rows, path)
        summary[name] = len(rows)
    print(json.dumps({"output": args.output, **summary}))
    return summary


def make_parser() -> argparse.ArgumentParser:
    """The `trl-ica` parser; `sft`, `dpo` and `simpo` are listed here but parsed by [`trl_ica.cli.launch`]."""
    from . import demo

    parser = argparse.ArgumentParser(prog="trl-ica", description="ICA data weighting and selection for TRL.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.make_parser(commands.add_parser("demo", help="Noisy-GSM8K LoRA demo on SmolLM2-135M-Instruct (CPU)."))
    _score_parser(commands.add_parser("score", help="Score every row of a dataset; writes rows with a score."))
    _select_parser(commands.add_parser("select", help="Keep the top/bottom share of scored rows, or a threshold."))
    data = commands.add_parser("data", help="Write noisy GSM8K SFT and preference files with clean holdouts.")
    data.add_argument("--output", required=True, help="Folder for train/holdout/test(_pairs).jsonl.")
    data.add_argument("--n-train", type=int, default=200)
    data.add_argument("--n-holdout", type=int, default=32)
    data.add_argument("--n-test", type=int, default=100)
    data.add_argument("--noise", type=float, default=0.3, help="Share of corrupted rows (flipped pairs).")
    data.add_argument("--seed", type=int, default=0)
    for name in ("sft", "dpo", "simpo"):
        commands.add_parser(
            name, help=f"ICA-weighted {name.upper()} training (TRL script; see --help).", add_help=False
        )
    return parser


def main(argv=None) -> None:
    """The `trl-ica` command. Returns None, so that the console script exits 0 on success (a returned object would be
    printed and exit 1); Python callers who want the trainer use [`trl_ica.cli.launch.main`]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sft", "dpo", "simpo"):  # launched as `trl sft|dpo` launch TRL's scripts
        from .launch import launch

        launch(argv)
        return None
    parser = make_parser()
    from . import demo

    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.quiet()
        demo.run(args)
    elif args.command == "score":
        demo.quiet()
        run_score(args)
    elif args.command == "data":
        run_data(args)
    else:
        run_select(args)


def forward_overhead(value: str | None):
    """`--forward-overhead`: None, `"measure"` or a number of tokens >= 0."""
    if value is None or value == "measure":
        return value
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise ValueError(f"`--forward-overhead` must be a number of tokens >= 0 or 'measure', got {value!r}.")
    return number
