"""SFT label noise where the noise hurts: does ICA weighting recover the gap between uniform and clean-only training?

A reasoning-gym task (default `basic_arithmetic`, one-digit operands) whose pool has a `--noise` share of answers
replaced by answers of another task (`--noise-kind other_task`, default `family_relationships`: the wrong kind of
answer, as when a data pipeline mixes its sources) or by the answers of other questions of the same task
(`--noise-kind shuffled`: wrong answers of the right kind); a clean holdout and test split of the task. Or GSM8K
(`--task gsm8k --noise-kind corrupted --noise-task ""`): a wrong final number, another problem's solution or the first
half of the solution, evenly mixed, measured by the final number of greedy answers.
SmolLM2-135M-Instruct, LoRA on the top `--top-layers` layers, the same steps for every method:

- `uniform`: stock SFT on the noisy pool; `oracle`: stock SFT on its clean rows only;
- `ica`: ICA weights, the paper's score (difference, sum), step-level batch min-max, R = 1, k = 3 fixed demos, in
  the paper's layout (`ica_demo_layout="in_turn"`, as every method without `turns` in its name);
- `ica_conditioned`: the same with `ica_score_form="conditioned"`, `ica_reduction="mean"`;
- `ica_conditioned_quantile`: the conditioned form with `ica_weighting="holdout_quantile"` (a row's weight is where
  its score falls among the holdout's own scores, whatever shares its batch);
- `loss_weights`: the loss baseline, mean log p(y | x) without demonstrations, through the same step-level min-max;
- `random_weights`: the same trainer and weighting fed uniformly random scores (weights of the same spread that
  carry no information);
- `top_conditioned`, `top_ica`, `top_loss`, `top_turns`: stock SFT on the `--top-fraction` of the pool each score
  ranks highest (`top_turns`: the conditioned form with the demonstrations as earlier turns);
- `ica_turns_quantile`: `ica_conditioned_quantile` with the demonstrations as earlier turns
  (`ica_demo_layout="turns"`); `ica_turns`: the paper's setting (`ica`) with that layout;
- `ica_cutoff`, `ica_turns_cutoff`: `ica_conditioned_quantile` / `ica_turns_quantile` with
  `ica_holdout_cutoff=0.1`: full weight for every row that scores like the holdout's lowest tenth or better;
- `ica_knn_quantile`, `ica_grouped_quantile`: `ica_conditioned_quantile` with kNN demonstrations (exact, or one
  list per group of rows: `ica_demo_selection="knn"` / `"knn_grouped"`) instead of fixed ones;
- `ica_quantile_r4`, `ica_quantile_online`: `ica_conditioned_quantile` rescored by the trainer during training with
  the current model, four times (`ica_refresh=4`) or at every step (`"online"`, the holdout's own scores every 10
  steps; `ica_quantile_online_fresh`: every step) instead of once before training;
- `ica_turns_quantile_wmean`, `ica_conditioned_quantile_wmean`, `random_weights_wmean`: those runs with
  `ica_loss_reduction="weighted_mean"`, the weighted loss divided by the step's weighted tokens rather than its
  tokens, so the step size does not shrink with the mean weight;
- `qwen_turns_quantile`, `qwen_turns_quantile_wmean`, `top_qwen_turns`: `ica_turns_quantile`, its `weighted_mean`
  run and `top_turns` with the scores of a scoring model of its own, Qwen2.5-Coder-0.5B-Instruct
  (`ica_scoring_model`; the holdout's own scores by the same model), while SmolLM2 is trained;
- `ica_posterior`: the recommended score with `ica_weighting="holdout_posterior"` (holdout-like rows keep weight
  about 1, the others go to 0); `ica_sampling`, `ica_quantile_sampling`: the recommended score's posterior or
  `holdout_quantile` weights as sampling probabilities (`ica_weight_mode="sampling"`: full batches, the stock loss);
  `shuffled_posterior`, `shuffled_sampling`, `shuffled_quantile_sampling`: the same runs with the scores dealt to
  other rows at random, the control whose weights have exactly the method's spread;
- `span_quantile`, `span_sampling`, `top_span`, `shuffled_span_sampling` (GSM8K): the conditioned score of the
  final-answer line alone (`ica_score_span="#### .*"`, rows without one at -inf) as `holdout_quantile` loss weights,
  as posterior sampling weights, as top-share selection, and the sampling control;
- `lastline_sampling`, `shuffled_lastline_sampling` (any data): the conditioned score of the response's last line
  and its closing token (`ica_score_span="last_line"`), which needs no pattern of the data's own, as posterior
  sampling weights, and its control;
- `token_mask`, `sampling_token_mask`, `shuffled_token_mask`: every row (or the rows `ica_sampling` draws) with
  the tokens the model with demonstrations finds less likely than the holdout's 1st percentile dropped from the
  loss (`ica_token_quantile=0.01`), and the control that drops as many tokens of each row at random positions;
- `oracle_wrong_answer`, `oracle_other_question`, `oracle_truncated` (GSM8K): stock SFT on the pool without one kind
  of corrupted row, what removing that kind alone is worth; `uniform_subset`: stock SFT on a random subset of the
  oracle's size, which separates removing the noise from training fewer rows more often;
- with the setting `"metrics": "answer"` (GSM8K) runs are measured by the full-answer loss, the loss of the
  final-answer span and the probability of ending early, all teacher-forced, instead of loss and greedy accuracy;
- with the setting `"model": "qwen2.5-coder-0.5b-instruct"` the 0.5B model is trained instead (a proxy for a larger
  trained model): `ica_turns_quantile` and `top_turns` then use its own scores, and `smol_turns_quantile`,
  `top_smol_turns` those of SmolLM2-135M (`ica_scoring_model`), a scorer a quarter its size
  (`smol_turns_quantile_wmean`: that run under `ica_loss_reduction="weighted_mean"`).

The pool is scored once per seed and the scores given to each ICA run (`ICAController.use_scores`); the scores are
kept in the results file, so a method added later trains without scoring again. Reported: the
clean test loss (nats/token) and exact-match accuracy, and the share of the noise gap a method recovers,
(uniform - method) / (uniform - oracle), per seed and of the means over seeds (the per-seed share is unstable when
a seed's gap is near 0), with per-seed wins against uniform; the plot shows each seed's paired difference.

    python -m benchmarks.label_noise --seeds 0 1 2 [--results benchmarks/results/label_noise/other_task.json]

Every finished (method, seed) run is kept in the JSON file (written whole) and skipped when run again; the file
records the data and training settings, and a run with other settings is refused. `--keep-logs DIR` keeps every
ICA run's `ica/` folder and traces, step by step, the scores and weights of the clean and the noisy rows it trained
on against the holdout's median score (`trace.json`, `trace.png`): how a rescored run's weights move in training.
"""

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch

from benchmarks.common.evaluation import evaluate, gsm8k_accuracy, gsm8k_answer_metrics, test_loss
from benchmarks.common.models import MODELS, QWEN_05B, model_path, top_layer_lora, training_settings
from benchmarks.common.results import check_settings
from benchmarks.common.results import load as load_results
from benchmarks.common.results import save as save_results
from trl_ica.cli.scenarios import LABEL_NOISE_KINDS, LABEL_NOISE_TASKS, noisy_gsm8k, reasoning_gym_label_noise
from trl_ica.data_io import write_json
from trl_ica.embedded import DEFAULT_MODEL, load_model
from trl_ica.scoring.ica import score_ica
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.selection.baselines import select_top

warnings.filterwarnings("ignore")
METHODS = (
    "uniform",
    "oracle",
    "ica",
    "ica_conditioned",
    "random_weights",
    "ica_conditioned_quantile",
    "loss_weights",
    "top_conditioned",
    "top_ica",
    "top_loss",
    "top_turns",
    "ica_turns_quantile",
    "ica_turns",
    "ica_cutoff",
    "ica_turns_cutoff",
    "ica_knn_quantile",
    "ica_grouped_quantile",
    "ica_quantile_r4",
    "ica_quantile_online",
    "ica_quantile_online_fresh",
    "ica_turns_quantile_wmean",
    "ica_conditioned_quantile_wmean",
    "random_weights_wmean",
    "qwen_turns_quantile",
    "qwen_turns_quantile_wmean",
    "top_qwen_turns",
    "smol_turns_quantile",
    "smol_turns_quantile_wmean",
    "top_smol_turns",
    "oracle_wrong_answer",
    "oracle_other_question",
    "oracle_truncated",
    "uniform_subset",
    "ica_posterior",
    "ica_sampling",
    "ica_quantile_sampling",
    "shuffled_posterior",
    "shuffled_sampling",
    "shuffled_quantile_sampling",
    "span_quantile",
    "span_sampling",
    "shuffled_span_sampling",
    "top_span",
    "lastline_sampling",
    "shuffled_lastline_sampling",
    "token_mask",
    "shuffled_token_mask",
    "sampling_token_mask",
)
#: Stock SFT on the pool without one kind of corrupted row (GSM8K): what removing that kind alone is worth.
KIND_ORACLES = {
    "oracle_wrong_answer": "wrong_answer",
    "oracle_other_question": "other_question",
    "oracle_truncated": "truncated",
}
#: Stock SFT trained without scores or weights, on the rows `rows_of` picks.
STOCK = ("uniform", "oracle", "uniform_subset", *KIND_ORACLES)
# Stock SFT on the rows a score ranks in its top `--top-fraction`.
TOP = ("top_conditioned", "top_ica", "top_loss", "top_turns", "top_qwen_turns", "top_smol_turns", "top_span")
# The pool scores each method trains with (or selects by), scored once per seed: `in_turn` (the paper's layout,
# which every method without `turns` in its name uses; both passes), `turns` (the demonstrations as earlier turns),
# `knn` and `grouped` (other demonstrations, the conditioned pass), and `random` scores for the control.
SCORE_OF = {
    "ica": "paper",
    "ica_conditioned": "conditioned",
    "ica_conditioned_quantile": "conditioned",
    "ica_cutoff": "conditioned",
    "loss_weights": "loss",
    "random_weights": "random",
    "top_conditioned": "conditioned",
    "top_ica": "paper",
    "top_loss": "loss",
    "top_turns": "turns_conditioned",
    "ica_turns_quantile": "turns_conditioned",
    "ica_turns_cutoff": "turns_conditioned",
    "ica_turns": "turns_paper",
    "ica_knn_quantile": "knn_conditioned",
    "ica_grouped_quantile": "grouped_conditioned",
    "ica_turns_quantile_wmean": "turns_conditioned",
    "ica_conditioned_quantile_wmean": "conditioned",
    "random_weights_wmean": "random",
    "qwen_turns_quantile": "qwen_turns_conditioned",
    "qwen_turns_quantile_wmean": "qwen_turns_conditioned",
    "top_qwen_turns": "qwen_turns_conditioned",
    "smol_turns_quantile": "smol_turns_conditioned",
    "top_smol_turns": "smol_turns_conditioned",
    "smol_turns_quantile_wmean": "smol_turns_conditioned",
    "ica_posterior": "turns_conditioned",
    "ica_sampling": "turns_conditioned",
    "ica_quantile_sampling": "turns_conditioned",
    "shuffled_posterior": "shuffled_turns_conditioned",
    "shuffled_sampling": "shuffled_turns_conditioned",
    "shuffled_quantile_sampling": "shuffled_turns_conditioned",
    "span_quantile": "span_conditioned",
    "span_sampling": "span_conditioned",
    "top_span": "span_conditioned",
    "shuffled_span_sampling": "shuffled_span_conditioned",
    "lastline_sampling": "lastline_conditioned",
    "shuffled_lastline_sampling": "shuffled_lastline_conditioned",
}
#: The span GSM8K's final answer is scored by (`ica_score_span`).
GSM8K_SPAN = "#### .*"
SCORINGS = {  # the scoring each score comes from, and its `score_ica` arguments (`model`: else the trained one)
    "in_turn": ({"paper", "conditioned", "loss"}, {"layout": "in_turn"}),
    "turns": ({"turns_paper", "turns_conditioned"}, {"layout": "turns"}),
    "knn": ({"knn_conditioned"}, {"demo_selection": "knn", "form": "conditioned"}),
    "grouped": ({"grouped_conditioned"}, {"demo_selection": "knn_grouped", "form": "conditioned"}),
    "qwen_turns": ({"qwen_turns_conditioned"}, {"layout": "turns", "form": "conditioned", "model": QWEN_05B}),
    "smol_turns": ({"smol_turns_conditioned"}, {"layout": "turns", "form": "conditioned", "model": DEFAULT_MODEL}),
    # GSM8K: the final-answer line alone (`ica_score_span`), per token; rows without one score -inf
    "span": (
        {"span_conditioned"},
        {"layout": "turns", "form": "conditioned", "reduction": "mean", "span": GSM8K_SPAN},
    ),
    # any data: the response's last line with its closing token (`ica_score_span="last_line"`), per token
    "lastline": (
        {"lastline_conditioned"},
        {"layout": "turns", "form": "conditioned", "reduction": "mean", "span": "last_line"},
    ),
}


def pool_scores(results, names, rows, holdout, clean, seed, trained=DEFAULT_MODEL, kinds=None) -> dict:
    """The pool's scores `names` for `seed`: kept in `results["scores"]` (so a rerun does not score again), else
    computed by the scorings that give them (the `trained` model unless said, k = 3, fixed demonstrations unless
    said), with their AUROC of the clean rows over the noisy ones and their scoring time recorded; with `kinds` (each
    row's kind of noise) also the AUROC of the clean rows over each kind (`auroc <score> <kind>`)."""
    from trl_ica.cli.scenarios import auroc

    kept = results.setdefault("scores", {})
    scores = {"random": np.random.default_rng(seed).random(len(rows))}
    # `shuffled_<name>`: the scores <name> dealt to other rows at random, a control whose weights have exactly the
    # spread of <name>'s (the same multiset) and carry none of its information
    shuffled = {n for n in names if n.startswith("shuffled_")}
    names = (names - shuffled) | {n.removeprefix("shuffled_") for n in shuffled}
    for scoring, (gives, options) in SCORINGS.items():
        if not (names & gives) or all(str(seed) in kept.get(n, {}) for n in gives):
            continue
        options = dict(options)
        model, tokenizer = load_model(model_path(options.pop("model", trained)))
        start = time.perf_counter()
        settings = {"demo_selection": "fixed", "form": "difference", "reduction": "sum", "span": None, **options}
        out = score_ica(
            model, tokenizer, rows, holdout, ICAScoringOptions(num_demos=3, seed=seed, **settings), show_progress=False
        )
        results.setdefault(f"scoring seconds {scoring}", {})[str(seed)] = time.perf_counter() - start
        prefix = "" if scoring == "in_turn" else f"{scoring}_"
        # a span score's rows without the span are -inf in `scores` (the mean form's own value)
        values = {f"{prefix}conditioned": out.scores if "span" in options else out.logp_conditioned / out.num_tokens}
        if options.get("form") != "conditioned":
            values[f"{prefix}paper"] = out.scores
        if scoring == "in_turn":
            values["loss"] = out.logp_unconditioned / out.num_tokens
        for name, v in values.items():
            kept.setdefault(name, {})[str(seed)] = [float(x) for x in v]
            results.setdefault(f"auroc {name}", {})[str(seed)] = auroc(v, clean)
            print(f"  [seed {seed}] {name}: AUROC clean vs noisy {auroc(v, clean):.3f}", flush=True)
            for kind in sorted(set(kinds) - {"clean"}) if kinds is not None and len(set(kinds)) > 2 else ():
                mask = clean | (kinds == kind)
                results.setdefault(f"auroc {name} {kind}", {})[str(seed)] = auroc(np.asarray(v)[mask], clean[mask])
    scores.update({n: np.array(kept[n][str(seed)]) for n in names if n != "random"})
    for name in shuffled:
        base = scores[name.removeprefix("shuffled_")]
        scores[name] = base[np.random.default_rng([seed, 1]).permutation(len(base))]
    return scores


# ICA trainer settings per weighted method (the scores come from one scoring per seed): the conditioned form with
# `holdout_quantile` is the base of every `*_quantile` and `*_cutoff` method.
CONDITIONED = dict(ica_score_form="conditioned", ica_reduction="mean")
QUANTILE = dict(CONDITIONED, ica_weighting="holdout_quantile")
LASTLINE_SAMPLING = dict(
    CONDITIONED,
    ica_weighting="holdout_posterior",
    ica_demo_layout="turns",
    ica_weight_mode="sampling",
    ica_score_span="last_line",
)
SETTINGS = {
    "ica": {},
    "ica_conditioned": CONDITIONED,
    "ica_conditioned_quantile": QUANTILE,
    "loss_weights": {},
    "random_weights": {},
    "ica_turns_quantile": dict(QUANTILE, ica_demo_layout="turns"),
    "ica_turns": dict(ica_demo_layout="turns"),
    "ica_cutoff": dict(QUANTILE, ica_holdout_cutoff=0.1),
    "ica_turns_cutoff": dict(QUANTILE, ica_holdout_cutoff=0.1, ica_demo_layout="turns"),
    "ica_quantile_r4": dict(QUANTILE, ica_refresh=4),
    "ica_quantile_online": dict(QUANTILE, ica_refresh="online", ica_holdout_rescore_steps=10),
    "ica_quantile_online_fresh": dict(QUANTILE, ica_refresh="online", ica_holdout_rescore_steps=1),
    "ica_knn_quantile": dict(QUANTILE, ica_demo_selection="knn"),
    "ica_grouped_quantile": dict(QUANTILE, ica_demo_selection="knn_grouped"),
    # `*_wmean`: the same run with the weighted loss divided by the step's weighted tokens (`ica_loss_reduction`)
    "ica_turns_quantile_wmean": dict(QUANTILE, ica_demo_layout="turns", ica_loss_reduction="weighted_mean"),
    "ica_conditioned_quantile_wmean": dict(QUANTILE, ica_loss_reduction="weighted_mean"),
    "random_weights_wmean": dict(ica_loss_reduction="weighted_mean"),
    # scored by another model than the one trained (its name stands for its converted folder, `qwen_05b_path`)
    "qwen_turns_quantile": dict(QUANTILE, ica_demo_layout="turns", ica_scoring_model=QWEN_05B),
    "qwen_turns_quantile_wmean": dict(
        QUANTILE, ica_demo_layout="turns", ica_scoring_model=QWEN_05B, ica_loss_reduction="weighted_mean"
    ),
    # the recommended score with the weights that keep clean rows whole, as loss weights or as sampling
    # probabilities; `shuffled_*`: the same weights dealt to other rows (the control of the same spread)
    "ica_posterior": dict(CONDITIONED, ica_weighting="holdout_posterior", ica_demo_layout="turns"),
    "ica_sampling": dict(
        CONDITIONED, ica_weighting="holdout_posterior", ica_demo_layout="turns", ica_weight_mode="sampling"
    ),
    "ica_quantile_sampling": dict(QUANTILE, ica_demo_layout="turns", ica_weight_mode="sampling"),
    "shuffled_posterior": dict(CONDITIONED, ica_weighting="holdout_posterior", ica_demo_layout="turns"),
    "shuffled_sampling": dict(
        CONDITIONED, ica_weighting="holdout_posterior", ica_demo_layout="turns", ica_weight_mode="sampling"
    ),
    "shuffled_quantile_sampling": dict(QUANTILE, ica_demo_layout="turns", ica_weight_mode="sampling"),
    # GSM8K: scored by the final-answer line (`ica_score_span`), as loss weights or sampling probabilities
    "span_quantile": dict(QUANTILE, ica_demo_layout="turns", ica_score_span=GSM8K_SPAN),
    "span_sampling": dict(
        CONDITIONED,
        ica_weighting="holdout_posterior",
        ica_demo_layout="turns",
        ica_weight_mode="sampling",
        ica_score_span=GSM8K_SPAN,
    ),
    "shuffled_span_sampling": dict(
        CONDITIONED,
        ica_weighting="holdout_posterior",
        ica_demo_layout="turns",
        ica_weight_mode="sampling",
        ica_score_span=GSM8K_SPAN,
    ),
    # any data: scored by the response's last line and its closing token, as sampling probabilities (the control
    # trains with the same settings; only its scores are dealt to other rows)
    "lastline_sampling": LASTLINE_SAMPLING,
    "shuffled_lastline_sampling": LASTLINE_SAMPLING,
    # token masks (`ica_token_quantile`): every row trained, its tokens under the holdout's 1st percentile with the
    # demonstrations dropped; alone, on sampled rows, and the control that drops as many tokens of each row at
    # random positions. The trainer scores itself: the masks need each token's log-prob, which given scores lack.
    "token_mask": dict(CONDITIONED, ica_weighting="none", ica_demo_layout="turns", ica_token_quantile=0.01),
    "shuffled_token_mask": dict(CONDITIONED, ica_weighting="none", ica_demo_layout="turns", ica_token_quantile=0.01),
    "sampling_token_mask": dict(
        CONDITIONED,
        ica_weighting="holdout_posterior",
        ica_demo_layout="turns",
        ica_weight_mode="sampling",
        ica_token_quantile=0.01,
    ),
    # the small model scoring for a larger trained one (settings `"model": QWEN_05B`)
    "smol_turns_quantile": dict(QUANTILE, ica_demo_layout="turns", ica_scoring_model=DEFAULT_MODEL),
    "smol_turns_quantile_wmean": dict(
        QUANTILE, ica_demo_layout="turns", ica_scoring_model=DEFAULT_MODEL, ica_loss_reduction="weighted_mean"
    ),
}


#: The noise kinds: reasoning-gym's ([`LABEL_NOISE_KINDS`]) and GSM8K's own (`task` "gsm8k", `noise_kind`
#: "corrupted", `noise_task` ""): a wrong final number, another problem's solution or the first half of the
#: solution, evenly mixed ([`noisy_gsm8k`]).
NOISE_KINDS = {**LABEL_NOISE_KINDS, "corrupted": "wrong, mismatched or truncated answers"}


def check_task(settings):
    """Refuse a GSM8K setting that is not GSM8K's own noise, and the reverse."""
    gsm8k = settings["task"] == "gsm8k"
    if gsm8k != (settings["noise_kind"] == "corrupted") or (gsm8k and settings["noise_task"]):
        raise SystemExit(
            f"settings task={settings['task']!r}, noise_kind={settings['noise_kind']!r}, noise_task="
            f"{settings['noise_task']!r}: GSM8K is trained with its own noise only (task 'gsm8k', "
            "noise_kind 'corrupted', noise_task ''), and 'corrupted' applies to GSM8K only."
        )


def make_data(args, seed):
    """The pool, holdout and test split of [`reasoning_gym_label_noise`] (or [`noisy_gsm8k`] for the task "gsm8k"),
    each pool row's kind (`"clean"`, else its corruption: GSM8K's [`CORRUPTIONS`], or `"noisy"`), and
    `measure(model, tokenizer, test)`: a dict of the clean test loss and the accuracy by the task's own answer check
    (GSM8K: the final number), or under the setting `"metrics": "answer"` (GSM8K) the full-answer loss, the loss of
    the final-answer span and the probability of ending early ([`gsm8k_answer_metrics`]) instead."""
    import reasoning_gym

    if args.task == "gsm8k":
        train, holdout, test = noisy_gsm8k(args.n_train, args.n_holdout, args.n_test, args.noise, seed)
        kinds = np.array(train["corruption"])

        def measure(model, tokenizer, test):
            if getattr(args, "metrics", "accuracy") == "answer":
                return gsm8k_answer_metrics(model, tokenizer, test)
            return dict(loss=test_loss(model, tokenizer, test), accuracy=gsm8k_accuracy(model, tokenizer, test))

        return train.remove_columns("corruption"), kinds, holdout, test, measure
    train, holdout, test, clean = reasoning_gym_label_noise(
        args.task, args.noise_task, args.noise, args.noise_kind, args.n_train, args.n_holdout, args.n_test, seed
    )
    checker = reasoning_gym.create_dataset(args.task, size=1, seed=0, **LABEL_NOISE_TASKS.get(args.task, {}))

    def measure(model, tokenizer, test):
        loss, accuracy = evaluate(model, tokenizer, test, checker)
        return dict(loss=loss, accuracy=accuracy)

    return train, np.where(clean, "clean", "noisy"), holdout, test, measure


def train(method, rows, holdout, scores, seed, args, keep=None):
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer

    model, tokenizer = load_model(model_path(args.model))
    lora = top_layer_lora(model, args.top_layers)
    with tempfile.TemporaryDirectory() as out:
        common = training_settings(out, args, seed)
        if method in STOCK or method in TOP:
            trainer = SFTTrainer(
                model, args=SFTConfig(**common), train_dataset=rows, processing_class=tokenizer, peft_config=lora
            )
        else:
            fields = {"ica_demo_selection": "fixed", "ica_demo_layout": "in_turn", **SETTINGS[method]}
            if "ica_scoring_model" in fields:
                fields["ica_scoring_model"] = model_path(fields["ica_scoring_model"])
            # the paper's settings with the closing token scored are the base every method was measured from
            base = dict(ica_preset="paper", ica_score_end_token=True)
            config = ICASFTConfig(**common, ica_num_demos=3, ica_seed=seed, **{**base, **fields})
            trainer = ICASFTTrainer(
                model,
                args=config,
                train_dataset=rows,
                processing_class=tokenizer,
                holdout_dataset=holdout,
                peft_config=lora,
            )
            if method in SCORE_OF:  # scored once before training; the others score themselves
                trainer.ica.use_scores(scores[SCORE_OF[method]], f"bench_label_noise {method}")
            if method.startswith("shuffled_token"):
                shuffle_token_masks(trainer.ica, seed)
        trainer.train()
        masks = None
        if isinstance(trainer, ICASFTTrainer) and trainer.ica.token_quantile is not None:
            masks = trainer.ica.token_masks(np.arange(len(rows)))  # as the last scoring left them
        logged = os.path.join(out, "ica", "weights.jsonl")  # every trained row's weight, for the report
        if keep and os.path.isdir(os.path.join(out, "ica")):  # the run's ica/ folder: scores, weights, holdout
            shutil.copytree(os.path.join(out, "ica"), keep, dirs_exist_ok=True)
        weights = [json.loads(line) for line in open(logged)] if os.path.isfile(logged) else []
    return trainer.model.eval(), tokenizer, weights, masks


def shuffle_token_masks(controller, seed: int) -> None:
    """The control of token masks: each row loses as many tokens as its mask drops, at random positions (the same
    positions at every step of a run)."""
    masks = controller.token_masks
    cache = {}

    def shuffled(indices):
        out = masks(indices)
        if out is None:
            return None
        version = controller.state.refreshes_done
        return [
            cache.setdefault((version, int(i)), np.random.default_rng([seed, int(i)]).permutation(m))
            for i, m in zip(np.asarray(indices).reshape(-1), out)
        ]

    controller.token_masks = shuffled


SETTING_KEYS = (
    "task",
    "noise_task",
    "noise",
    "noise_kind",
    "steps",
    "batch_size",
    "lr",
    "top_layers",
    "n_train",
    "n_holdout",
    "n_test",
    "top_fraction",
)
#: Settings an experiment may leave out, with the value it then has: `model`, the trained model (the embedded
#: SmolLM2-135M-Instruct, or QWEN_05B).
#: `metrics`: `"accuracy"` (the clean test loss and greedy accuracy) or `"answer"` (GSM8K: the test loss, the
#: final-answer span's loss and the probability of ending early, all teacher-forced; no generation).
OPTIONAL_SETTINGS = {"model": DEFAULT_MODEL, "metrics": "accuracy"}


def table(results, methods, labels=None) -> list[str]:
    """The results as markdown: per method, each measure of the run (the clean test loss and accuracy, or the test
    loss, the final-answer span's loss and the probability of ending early) as mean ± std over the seeds that have
    uniform and oracle runs, the share of the loss's noise gap it recovers per seed and of the means, and its wins over
    uniform training; then, per measure, every method's paired difference from uniform training in paired standard
    deviations (the oracle's is the noise gap a method can recover: under 3 the pool cannot rank methods), the mean
    weights of the clean and noisy rows and the scores' AUROC. `labels` names the methods (default: their keys)."""
    labels = labels or {}
    runs_of = {k: v for k, v in results.items() if k not in ("settings", "scores")}
    seeds = sorted({s for m in runs_of.values() for s in m}, key=int)
    both = [s for s in seeds if s in runs_of.get("uniform", {}) and s in runs_of.get("oracle", {})]
    if not both:
        done = {m: len(r) for m, r in runs_of.items() if r}
        return [f"No seed has both a uniform and an oracle run yet (runs kept: {done or 'none'})."]
    measures = [m for m in MEASURES if m in runs_of["uniform"][both[0]]]
    lines = [
        f"| method | seeds | {' | '.join(MEASURES[m] for m in measures)} | share of the loss's noise gap recovered: "
        "per seed / of the means | seeds better than uniform |",
        "|---|---|" + "---|" * len(measures) + "---|---|",
    ]
    for method in methods:
        runs = runs_of.get(method, {})
        done = [s for s in both if s in runs]
        if not done:
            continue
        values = {m: np.array([runs[s][m] for s in done]) for m in measures}
        loss = values["loss"]
        uniform = np.array([runs_of["uniform"][s]["loss"] for s in done])
        oracle = np.array([runs_of["oracle"][s]["loss"] for s in done])
        share = (uniform - loss) / (uniform - oracle)
        pooled = (uniform.mean() - loss.mean()) / (uniform.mean() - oracle.mean())  # steady where a seed's gap is ~0
        wins = int((loss < uniform).sum())
        shown = " | ".join(
            f"{v.mean():.4f} ± {v.std():.4f}" if m != "accuracy" else f"{v.mean():.3f} ± {v.std():.3f}"
            for m, v in values.items()
        )
        lines.append(
            f"| {labels.get(method, method)} | {len(done)} | {shown} | {share.mean():+.2f} ± "
            f"{share.std():.2f} / {pooled:+.2f} | {wins} of {len(done)} |"
        )
    lines.append("")
    lines.append(
        f"(Rebuilt by `python -m benchmarks.report`: mean ± standard deviation over each method's seeds "
        f"among {', '.join(both)}.)"
    )
    lines += paired_lines(runs_of, methods, [m for m in measures if m != "accuracy"], labels)
    for method in methods:
        runs = [r for r in runs_of.get(method, {}).values() if "weight_clean" in r]
        if runs:
            shown = {key: [r[key] for r in runs if r[key] is not None] for key in ("weight_clean", "weight_noisy")}
            shown = {key: f"{np.mean(v):.3f}" if v else "none trained" for key, v in shown.items()}
            line = (
                f"- {labels.get(method, method)}: mean weight of the clean rows {shown['weight_clean']}, of the "
                f"noisy {shown['weight_noisy']}"
            )
            if all("noisy_share_trained" in r for r in runs):
                line += f"; noisy share of the rows trained {np.mean([r['noisy_share_trained'] for r in runs]):.3f}"
            lines.append(f"{line} ({len(runs)} seeds)")
    for method in methods:
        runs = [r for r in runs_of.get(method, {}).values() if any(k.startswith("masked_share_") for k in r)]
        if runs:
            kinds = sorted({k.removeprefix("masked_share_") for r in runs for k in r if k.startswith("masked_share_")})
            shown = ", ".join(f"{kind} {np.mean([r[f'masked_share_{kind}'] for r in runs]):.3f}" for kind in kinds)
            aurocs = ", ".join(
                f"{kind} {np.mean([r[f'auroc_kept_{kind}'] for r in runs]):.3f}"
                for kind in kinds
                if all(f"auroc_kept_{kind}" in r for r in runs)
            )
            aurocs = f"; AUROC of the share of a row's tokens kept, clean over each kind: {aurocs}" if aurocs else ""
            lines.append(
                f"- {labels.get(method, method)}: share of each kind's tokens the masks dropped: {shown}"
                f"{aurocs} ({len(runs)} seeds)"
            )
    for key in sorted(k for k in results if k.startswith(("auroc ", "clean share "))):
        values = np.array(list(results[key].values()))
        lines.append(f"- {key}: {values.mean():.3f} ± {values.std():.3f} over {values.size} seeds")
    return lines


#: What a run measures on the clean test rows, as the tables name it (lower is better for each but accuracy).
MEASURES = {
    "loss": "clean test loss (nats/token)",
    "accuracy": "accuracy",
    "span_loss": "final-answer span loss (nats/token)",
    "early_end": "P(end) at a line end",
}


#: Measures compared in the paired tables by their logarithm (a difference of logs is a log ratio).
LOG_MEASURES = ("early_end",)


def paired_lines(runs_of, methods, measures, labels) -> list[str]:
    """Per measure, a table of each method's mean difference from uniform training on the same seeds, its paired
    standard deviation, their ratio and the seeds on which it was lower: the oracle's ratio says whether the pool can
    rank methods by that measure (3 or more in size), a method's whether it moved the measure beyond seed noise."""
    uniform = runs_of.get("uniform", {})
    lines = []
    for measure in measures:
        rows = []
        for method in methods:
            seeds = [s for s in runs_of.get(method, {}) if s in uniform and measure in runs_of[method][s]]
            if method == "uniform" or len(seeds) < 2:
                continue
            # a probability that moves by orders of magnitude between seeds is compared as a log ratio
            ours = np.array([runs_of[method][s][measure] for s in seeds])
            theirs = np.array([uniform[s][measure] for s in seeds])
            diff = np.log(ours) - np.log(theirs) if measure in LOG_MEASURES else ours - theirs
            sd = diff.std(ddof=1)
            ratio = f"{diff.mean() / sd:+.1f}" if sd > 0 else "n/a"
            rows.append(
                f"| {labels.get(method, method)} | {len(seeds)} | {diff.mean():+.4f} | {sd:.4f} | {ratio} | "
                f"{int((diff < 0).sum())} of {len(seeds)} |"
            )
        if rows:
            name = f"ln {MEASURES[measure]}" if measure in LOG_MEASURES else MEASURES[measure]
            lines += [
                "",
                f"{name}, minus uniform training's on the same seed:",
                "",
                "| method | seeds | mean difference | paired sd | in paired sd | seeds lower |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
    return lines + ([""] if lines else [])


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def trace(folder, weights, clean, title):
    """Step by step: the mean score and weight of the clean and the noisy rows trained on, and the median of the
    holdout's own scores at each of its scorings (`holdout_quantile`), written to `folder`/trace.json and plotted."""
    import glob

    steps = sorted({w["step"] for w in weights})
    rows = {"step": steps}
    for name, mask in (("clean", clean), ("noisy", ~clean)):
        for field in ("score", "weight"):
            rows[f"{field} {name}"] = [
                float(np.mean([w[field] for w in weights if w["step"] == s and mask[w["ica_index"]]] or [np.nan]))
                for s in steps
            ]
    holdout = []
    for path in sorted(glob.glob(os.path.join(folder, "holdout-*.jsonl"))):
        records = [json.loads(line) for line in open(path)]
        holdout.append((records[0]["step"], float(np.median([r["score"] for r in records]))))
    rows["holdout"] = sorted(holdout)  # by step: the files' names sort holdout-10 before holdout-2
    write_json(rows, os.path.join(folder, "trace.json"))
    plot_trace(rows, os.path.join(folder, "trace.png"), title)


def plot_trace(rows, path, title):
    """The plot of a `trace.json`'s `rows`: scores above, weights below, per optimizer step."""
    from trl_ica.plots import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for name, color in (("clean", "tab:blue"), ("noisy", "tab:red")):
        top.plot(rows["step"], rows[f"score {name}"], ".-", color=color, label=f"{name} rows trained at the step")
        bottom.plot(rows["step"], rows[f"weight {name}"], ".-", color=color, label=name)
    if rows["holdout"]:
        top.step(*zip(*rows["holdout"]), where="post", color="k", label="holdout's median score")
    top.set_ylabel("score (mean per step)")
    top.legend(fontsize=8)
    bottom.set_ylabel("weight (mean per step)")
    bottom.set_xlabel("optimizer step")
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results, methods, path, title):
    """Each method's clean test loss minus uniform training's on the same seed, one dot per seed and a bar at the
    mean (left of 0: better than uniform; the oracle's bar is the noise gap)."""
    from trl_ica.plots import pyplot

    plt = pyplot()
    uniform = results.get("uniform", {})
    rows = []
    for method in methods:
        seeds = [s for s in results.get(method, {}) if s in uniform]
        if method != "uniform" and seeds:
            rows.append((method, [results[method][s]["loss"] - uniform[s]["loss"] for s in seeds]))
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.42 * len(rows)))
    for i, (method, diffs) in enumerate(rows):
        ax.barh(i, np.mean(diffs), color="tab:green" if method == "oracle" else "tab:blue", alpha=0.6)
        ax.plot(diffs, [i] * len(diffs), "k.", ms=5)
    ax.axvline(0, color="grey", lw=0.8)  # uniform training
    ax.set_yticks(range(len(rows)), [f"{m} ({len(v)} seeds)" for m, v in rows], fontsize=8)
    ax.set_xlabel("clean test loss minus uniform training's, same seed (nats/token; left is better)")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\n![{title}]({os.path.basename(path)})")


def title_of(settings) -> str:
    """The plot's title for a run's settings, naming the trained model where it is not the default."""
    if settings["noise_kind"] == "mixture":
        others = len(settings["noise_task"].split(","))
        title = f"{settings['task']}, {settings['noise']:.0%} of the pool rows of {others} other tasks"
    else:
        kind = NOISE_KINDS[settings["noise_kind"]]
        title = f"{settings['task']}, {settings['noise']:.0%} of the rows with {kind}"
    model = settings.get("model", DEFAULT_MODEL)
    return title if model == DEFAULT_MODEL else f"{model} trained\n{title}"


def run(settings: dict, methods, seeds, results_path=None, keep_logs="") -> dict:
    """Every (method, seed) run not yet in `results_path`, each written there as it finishes; returns the results.
    `settings` holds the [`SETTING_KEYS`]; a results file made with other settings is refused."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not set(SETTING_KEYS) <= set(settings) <= {*SETTING_KEYS, *OPTIONAL_SETTINGS}:
        raise SystemExit(
            f"Unknown methods {unknown} or settings other than {list(SETTING_KEYS)} and optional "
            f"{list(OPTIONAL_SETTINGS)}: {sorted(settings)}."
        )
    check_task(settings)
    args = argparse.Namespace(**{**OPTIONAL_SETTINGS, **settings})
    if args.model not in MODELS:
        raise SystemExit(f"settings model={args.model!r}: the trained model is one of {list(MODELS)}.")
    results = load_results(results_path)
    check_settings(results, dict(settings), results_path)
    for seed in seeds:
        todo = [m for m in methods if str(seed) not in results.get(m, {})]
        if not todo:
            continue
        rows, kinds, holdout, test, measure = make_data(args, seed)
        clean = kinds == "clean"
        names = {SCORE_OF[m] for m in todo if m in SCORE_OF}
        scores = pool_scores(results, names, rows, holdout, clean, seed, args.model, kinds)
        for method in todo:
            start = time.perf_counter()
            if method == "oracle":
                data = rows.select(np.flatnonzero(clean))
            elif method in KIND_ORACLES:
                if KIND_ORACLES[method] not in set(kinds):
                    raise SystemExit(f"{method} drops the pool's {KIND_ORACLES[method]!r} rows; this pool has none.")
                data = rows.select(np.flatnonzero(kinds != KIND_ORACLES[method]))
            elif method == "uniform_subset":  # the oracle's number of rows, drawn at random from the whole pool
                subset = np.random.default_rng(seed).choice(len(rows), int(clean.sum()), replace=False)
                data = rows.select(np.sort(subset))
                results.setdefault(f"clean share {method}", {})[str(seed)] = float(clean[subset].mean())
            elif method in TOP:
                keep = select_top(scores[SCORE_OF[method]], args.top_fraction)
                data = rows.select(keep)
                results.setdefault(f"clean share {method}", {})[str(seed)] = float(clean[keep].mean())
            else:
                data = rows
            keep = os.path.join(keep_logs, f"{method}-seed{seed}") if keep_logs else None
            model, tokenizer, weights, masks = train(method, data, holdout, scores, seed, args, keep)
            if keep and weights:
                trace(keep, weights, clean, f"{method}, seed {seed}")
            metrics = measure(model, tokenizer, test)
            seconds = time.perf_counter() - start
            run = dict(**metrics, seconds=seconds)
            if weights:  # the mean weight the clean and the noisy rows were trained with (None: none trained)
                index = np.array([w["ica_index"] for w in weights])
                weight = np.array([w["weight"] for w in weights])
                run.update(
                    weight_clean=_mean_or_none(weight[clean[index]]),
                    weight_noisy=_mean_or_none(weight[~clean[index]]),
                    noisy_share_trained=float((~clean[index]).mean()),
                )
            if masks is not None:  # the share of each kind's tokens the last scoring's masks dropped
                from trl_ica.cli.scenarios import auroc

                kept = np.array([m.mean() if m.size else 1.0 for m in masks])  # a row's share of tokens kept
                for kind in sorted(set(kinds)):
                    rows_of_kind = [m for m, k in zip(masks, kinds) if k == kind]
                    dropped = sum(int((~m).sum()) for m in rows_of_kind)
                    run[f"masked_share_{kind}"] = dropped / max(1, sum(m.size for m in rows_of_kind))
                    if kind != "clean":  # how well the share of a row's tokens kept tells clean rows from this kind
                        both = clean | (kinds == kind)
                        run[f"auroc_kept_{kind}"] = auroc(kept[both], clean[both])
            results.setdefault(method, {})[str(seed)] = run
            save_results(results, results_path)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"  [seed {seed}] {method}: {shown} ({seconds:.0f} s)", flush=True)
    return results


def run_experiment(experiment: dict, methods=None, seeds=None, keep_logs="") -> None:
    """An experiment file's runs (its `methods` and `seeds` unless given), then its table and plot."""
    methods = methods or experiment["methods"]
    results = run(experiment["settings"], methods, seeds or experiment["seeds"], experiment["results"], keep_logs)
    print("\n".join(table(results, experiment["methods"], experiment.get("labels"))))
    if experiment.get("plot"):
        plot(results, experiment["methods"], experiment["plot"], title_of(experiment["settings"]))


def report_table(experiment: dict) -> list[str]:
    """The markdown table of an experiment's kept results (for `python -m benchmarks.report`)."""
    return table(load_results(experiment["results"]), experiment["methods"], experiment.get("labels"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--noise-task", default="family_relationships")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--top-layers", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-holdout", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--top-fraction", type=float, default=0.5, help="share of the pool the top_* methods keep")
    parser.add_argument(
        "--noise-kind",
        default="other_task",
        choices=list(NOISE_KINDS),
        help="other_task: answers of `--noise-task`; shuffled: answers of other questions of the same task; "
        "mixture: whole rows of the `--noise-task` tasks (comma-separated); corrupted: GSM8K's own (`--task gsm8k "
        '--noise-task ""`)',
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS, help="the trained model")
    parser.add_argument("--results", default=None)
    parser.add_argument(
        "--keep-logs",
        default="",
        help="Folder for each ICA run's ica/ logs (<method>-seed<s>), "
        "with trace.json and trace.png: the clean and noisy rows' scores and weights step by step, "
        "against the holdout's scores.",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = {k: getattr(args, k) for k in SETTING_KEYS}
    if args.model != DEFAULT_MODEL:
        settings["model"] = args.model
    results = run(settings, args.methods, args.seeds, args.results, args.keep_logs)
    print("\n".join(table(results, args.methods)))
    if args.results:
        plot(results, args.methods, os.path.splitext(args.results)[0] + ".png", title_of(settings))


if __name__ == "__main__":
    main()
