"""End-to-end quality: does ICA weighting help a LoRA fine-tune of SmolLM2-135M-Instruct? (CPU, offline data)

Scenarios, each over several seeds (a seed draws the data split and initialises the run):
- `sft`: a noisy GSM8K pool (a `noise` share corrupted: wrong final number, another problem's solution, truncated)
  with a clean holdout. Uniform SFT, ICA weights (one refresh, online, and the conditioned score form), a control
  with the same weighting of random scores (`random_weights`), and SFT on the top half of the pool by the ICA
  score, the conditioned score and the loss baseline, all for the same number of steps. Measured: the loss on
  clean test answers (nats/token) and the final-number accuracy of greedy answers to the test questions.
- `domain`: a pool mixing five reasoning-gym tasks, a holdout of the target task (leg counting). Same methods;
  measured on the target task's test split: loss and accuracy by reasoning-gym's own `score_answer`.
- `pref`: GSM8K preference pairs with a `noise` share flipped. DPO and SimPO: stock, the oracle (the stock
  trainer on the unflipped pairs only, same steps), ICA-weighted (`ica_*`: the paper's score; `_conditioned`: the
  per-token conditioned margin; `_turns`: demonstrations as earlier turns instead of in-turn; `_quantile`:
  `holdout_quantile` weights instead of batch min-max; `_wmean`: `ica_loss_reduction="weighted_mean"`, each pair
  counting 1) and `random_*` (batch min-max weights of random scores).
  Measured: preference accuracy on clean test pairs (DPO: implicit reward margin against the base model; SimPO:
  mean log-probability margin).

    python -m benchmarks.run benchmarks/experiments/quality/sft.json [--methods ...] [--seeds 0 1 2]

An experiment file names one scenario (`scenarios`), the data and training settings (`n_train`, `n_test`, `noise`,
`steps`, `batch_size`, `lr`), the methods and seeds. Every finished run is kept in its results file with its wall
time, and runs already in it are skipped: an interrupted run resumes, and new methods or seeds extend it; a file
made with other settings is refused. The report gives, per method, the mean and standard deviation over seeds, the
paired difference from the stock run of the same seed with the seeds it did better on and, where the oracle ran,
the share of the stock-to-oracle gap recovered; the plot shows each seed's paired difference.
"""

import argparse
import os
import tempfile
import time
import warnings

import numpy as np

from benchmarks.common.data import reasoning_gym_mixture
from benchmarks.common.evaluation import gsm8k_accuracy, reasoning_gym_accuracy, test_loss
from benchmarks.common.models import lora
from benchmarks.common.results import Results
from benchmarks.run import main as run_main
from trl_ica.cli.scenarios import noisy_gsm8k, noisy_gsm8k_pairs
from trl_ica.embedded import load_model
from trl_ica.scoring.engine import score_requests
from trl_ica.scoring.formats import read_dataset
from trl_ica.scoring.ica import score_ica, score_with
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.scoring.rendering import Renderer
from trl_ica.selection.baselines import select_top

warnings.filterwarnings("ignore")
SFT_METHODS = (
    "uniform",
    "ica",
    "ica_online",
    "ica_conditioned",
    "random_weights",
    "top_half_ica",
    "top_half_conditioned",
    "top_half_loss",
)
PREF_METHODS = (
    "dpo",
    "dpo_oracle",
    "ica_dpo",
    "ica_dpo_conditioned",
    "ica_dpo_conditioned_turns",
    "ica_dpo_conditioned_turns_quantile",
    "random_dpo",
    "simpo",
    "simpo_oracle",
    "ica_simpo",
    "ica_simpo_conditioned",
    "ica_simpo_conditioned_turns",
    "ica_simpo_conditioned_turns_quantile",
    "random_simpo",
    "ica_dpo_conditioned_turns_wmean",
    "random_dpo_wmean",
    "ica_simpo_conditioned_turns_wmean",
    "random_simpo_wmean",
    "ica_dpo_conditioned_turns_sampling",
    "shuffled_dpo_sampling",
    "ica_simpo_conditioned_turns_sampling",
    "shuffled_simpo_sampling",
)
SCENARIOS = ("sft", "domain", "pref")
METHODS = (*SFT_METHODS, *PREF_METHODS)
CONDITIONED = dict(ica_score_form="conditioned", ica_reduction="mean")  # the variant score (see the README)


def common(out, args, seed):
    return dict(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps),
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=seed,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )


def ica_fields(refresh, layout="in_turn"):
    """The paper's settings with the closing token scored (what the results were measured with), and `layout`."""
    return dict(
        ica_preset="paper",
        ica_score_end_token=True,
        ica_num_demos=3,
        ica_demo_selection="fixed",
        ica_demo_layout=layout,
        ica_refresh=refresh,
    )


def pref_ica_fields(method):
    """The `ica_*` fields of a preference method, read off its name: `_conditioned` (per-token conditioned margin),
    `_turns` (demonstrations as earlier turns; in-turn otherwise), `_quantile` (`holdout_quantile` weights;
    batch min-max otherwise), `_wmean` (`ica_loss_reduction="weighted_mean"`), `_sampling` (the pairs drawn by
    `holdout_posterior` weights, `ica_weight_mode="sampling"`). `random_*` is the batch min-max control fed random
    scores; `shuffled_*_sampling` the sampling run with its scores dealt to other pairs (the control of the same
    spread)."""
    if method.startswith("shuffled_"):
        return pref_ica_fields(method.replace("shuffled_", "ica_").replace("_sampling", "_conditioned_turns_sampling"))
    fields = ica_fields(1, "turns" if "_turns" in method else "in_turn")
    if "_conditioned" in method:
        fields.update(CONDITIONED)
    if method.endswith("_sampling"):
        fields.update(ica_weight_mode="sampling", ica_weighting="holdout_posterior")
    if method.endswith("_quantile"):
        fields["ica_weighting"] = "holdout_quantile"
    if method.endswith("_wmean"):
        fields["ica_loss_reduction"] = "weighted_mean"
    return fields


def train_sft(method, train, holdout, scores, seed, args):
    from trl import SFTConfig, SFTTrainer

    from trl_ica import ICASFTConfig, ICASFTTrainer

    model, tokenizer = load_model()
    with tempfile.TemporaryDirectory() as out:
        settings = dict(common(out, args, seed), max_length=1024)
        if method.startswith("ica") or method == "random_weights":
            variant = CONDITIONED if method == "ica_conditioned" else {}
            config = ICASFTConfig(**settings, **ica_fields("online" if method == "ica_online" else 1), **variant)
            trainer = ICASFTTrainer(
                model,
                args=config,
                train_dataset=train,
                processing_class=tokenizer,
                holdout_dataset=holdout,
                peft_config=lora(),
            )
            if method == "random_weights":  # control: the same batch min-max weighting of scores that carry no signal
                trainer.ica.use_scores(np.random.default_rng(seed).random(len(train)), "random")
        else:
            if method.startswith("top_half"):  # equal budget: the same steps over half the rows
                train = train.select(select_top(scores[method.split("_")[-1]], 0.5))
            trainer = SFTTrainer(
                model, args=SFTConfig(**settings), train_dataset=train, processing_class=tokenizer, peft_config=lora()
            )
        trainer.train()
    return trainer.model.eval(), tokenizer


BEFORE = "before training"
PREF_BEFORE = "before training (DPO margin / SimPO margin)"
SETTING_KEYS = ("n_train", "n_test", "noise", "steps", "batch_size", "lr")  # what a results file's runs share


def run_sft_like(name, make_data, accuracy, args, results):
    methods = [m for m in args.methods if m in SFT_METHODS]
    for seed in args.seeds:
        todo = [m for m in methods if not results.has(name, m, seed)]
        if not todo and results.has(name, BEFORE, seed):
            continue
        train, holdout, test = make_data(seed)
        model, tokenizer = load_model()
        scores = None
        if any(m.startswith("top_half") for m in todo):
            ica = score_ica(
                model,
                tokenizer,
                train,
                holdout,
                ICAScoringOptions(
                    num_demos=3,
                    demo_selection="fixed",
                    layout="in_turn",
                    form="difference",
                    reduction="sum",
                    span=None,
                ),
                show_progress=False,
            )
            scores = {  # the loss baseline is log p(y | x) per token, which the ICA pass without demos already has
                "ica": ica.scores,
                "conditioned": ica.logp_conditioned / ica.num_tokens,
                "loss": ica.logp_unconditioned / ica.num_tokens,
            }
        for method in todo:
            start = time.perf_counter()
            trained, tokenizer = train_sft(method, train, holdout, scores, seed, args)
            loss, correct = test_loss(trained, tokenizer, test), accuracy(trained, tokenizer, test)
            seconds = round(time.perf_counter() - start)
            results.add(name, method, seed, seconds=seconds, loss=loss, accuracy=correct)
            print(
                f"  [{name} seed {seed}] {method}: loss {loss:.4f}, accuracy {correct:.3f} ({seconds} s)", flush=True
            )
        if not results.has(name, BEFORE, seed):  # `model` scored, untrained
            results.add(
                name,
                BEFORE,
                seed,
                loss=test_loss(model, tokenizer, test),
                accuracy=accuracy(model.eval(), tokenizer, test),
            )


def pair_accuracy(model, base, tokenizer, test, simpo):
    """Share of clean test pairs the trained policy prefers correctly."""
    renderer = Renderer(tokenizer)
    pairs = read_dataset(test)
    requests = [renderer.unconditioned(p.as_sft(side)) for p in pairs for side in ("chosen", "rejected")]
    policy = score_requests(model, requests, show_progress=False, distributed="local")
    logps = policy.sums.reshape(-1, 2)
    if simpo:
        logps = logps / policy.counts.reshape(-1, 2)
    else:
        logps = logps - score_requests(base, requests, show_progress=False, distributed="local").sums.reshape(-1, 2)
    return float(np.mean(logps[:, 0] > logps[:, 1]))


def run_pref(args, results):
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from trl_ica import ICACPOTrainer, ICADPOConfig, ICADPOTrainer, ICASimPOConfig

    methods = [m for m in args.methods if m in PREF_METHODS]
    before = PREF_BEFORE
    for seed in args.seeds:
        todo = [m for m in methods if not results.has("pref", m, seed)]
        if not todo and results.has("pref", before, seed):
            continue
        train, holdout, test = noisy_gsm8k_pairs(args.n_train, 16, args.n_test, args.noise, seed)
        clean = train.filter(lambda row: not row["flipped"]).remove_columns("flipped")
        train = train.remove_columns("flipped")
        base, _ = load_model()
        for method in todo:
            start = time.perf_counter()
            model, tokenizer = load_model()
            with tempfile.TemporaryDirectory() as out:
                settings = dict(common(out, args, seed), max_length=1024)
                simpo = "simpo" in method
                stock = method in ("dpo", "simpo", "dpo_oracle", "simpo_oracle")
                rows = clean if method.endswith("_oracle") else train  # the oracle: the unflipped pairs only
                kw = dict(train_dataset=rows, processing_class=tokenizer, peft_config=lora())
                if stock and not simpo:
                    trainer = DPOTrainer(model, args=DPOConfig(**settings, beta=0.5), **kw)
                elif stock:
                    config = CPOConfig(**settings, loss_type="simpo", cpo_alpha=0.0, beta=2.5, simpo_gamma=1.375)
                    trainer = CPOTrainer(model, args=config, **kw)
                elif not simpo:
                    config = ICADPOConfig(**settings, beta=0.5, **pref_ica_fields(method))
                    trainer = ICADPOTrainer(model, args=config, holdout_dataset=holdout, **kw)
                else:
                    config = ICASimPOConfig(**settings, **pref_ica_fields(method))  # beta 2.5, gamma 1.375 as above
                    trainer = ICACPOTrainer(model, args=config, holdout_dataset=holdout, **kw)
                if method.startswith("random"):  # control: batch min-max weights of scores that carry no signal
                    trainer.ica.use_scores(np.random.default_rng(seed).random(len(train)), "random")
                if method.startswith("shuffled"):  # control: the run's own scores, dealt to other pairs
                    own = score_with(trainer.model, trainer.ica.builder, show_progress=False).scores
                    trainer.ica.use_scores(own[np.random.default_rng([seed, 1]).permutation(len(own))], "shuffled")
                trainer.train()
            accuracy = pair_accuracy(trainer.model.eval(), base, tokenizer, test, simpo)
            seconds = round(time.perf_counter() - start)
            results.add("pref", method, seed, seconds=seconds, accuracy=accuracy)
            print(f"  [pref seed {seed}] {method}: pair accuracy {accuracy:.3f} ({seconds} s)", flush=True)
        if not results.has("pref", before, seed):
            results.add("pref", before, seed, accuracy=pair_accuracy(base, base, tokenizer, test, True))


def baseline_of(method):
    """The stock run an ICA method is compared with, seed by seed: the same trainer with uniform weights."""
    if method.startswith("before"):
        return None
    return "simpo" if "simpo" in method else "dpo" if "dpo" in method else "uniform"


def oracle_of(method):
    """The clean-only run that bounds a method from above, where the scenario has one."""
    base = baseline_of(method)
    return None if base is None or method.endswith("oracle") else f"{base}_oracle"


def table_lines(results, raw) -> list[str]:
    """Mean ± sd over seeds, and the mean paired difference from the stock run on the same seeds with the number of
    seeds on which the method did better (seeds differ more from each other than methods do, so the paired
    difference is the comparison to read; the count is this benchmark's analogue of the paper's win rate).
    `results` is `Results.table`'s `{method: {metric: [value per seed]}}`, `raw` the scenario's kept runs."""
    if not results:
        return ["No results yet."]
    metrics = list(next(iter(results.values())))
    header = [f"{m} (mean ± sd)" for m in metrics] + [f"{m}: paired diff. from stock" for m in metrics]
    oracles = any(oracle_of(m) in raw for m in results)
    if oracles:
        header += [f"{m}: share of the gap to the oracle" for m in metrics]
    per_seed = len(metrics) == 1  # room for each seed's value
    if per_seed:
        header += [f"{metrics[0]} per seed (in seed order)"]
    lines = ["| method | " + " | ".join(header) + " | seeds |", "|---|" + "---|" * (len(header) + 1)]
    for method, values in results.items():
        cells = [f"{np.mean(values[m]):.4f} ± {np.std(values[m]):.4f}" for m in metrics]
        base = baseline_of(method)
        for m in metrics:
            if base is None or base == method or base not in raw:
                cells.append("")
                continue
            mine, theirs = raw[method][m], raw[base][m]
            diffs = np.array([mine[s] - theirs[s] for s in mine if s in theirs])
            wins = int(((diffs < 0) if m == "loss" else (diffs > 0)).sum())  # seeds on which the method is better
            cells.append(f"{diffs.mean():+.4f}, better on {wins}/{len(diffs)}" if len(diffs) else "")
        if oracles:
            cells += [gap_share(raw, method, m) for m in metrics]
        if per_seed:
            cells.append(", ".join(f"{v:.3f}" for v in values[metrics[0]]))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(values[metrics[0]])} |")
    return lines


def kept(experiment: dict):
    """The experiment's kept runs: `(Results, {method: {metric: [value per seed]}}, raw runs)` of its scenario,
    for its methods and the untrained model, over its seeds."""
    (name,) = experiment["scenarios"]
    results = Results(experiment["results"], experiment["settings"], METHODS)
    table = results.table(name, experiment["seeds"])
    shown = {*experiment["methods"], BEFORE, PREF_BEFORE}
    return results, {m: v for m, v in table.items() if m in shown}, results.data.get(name, {})


def report_table(experiment: dict) -> list[str]:
    """The markdown table of an experiment's kept results (for `python -m benchmarks.report`)."""
    _, table, raw = kept(experiment)
    return table_lines(table, raw)


def run_experiment(experiment: dict, methods=None, seeds=None, keep_logs="") -> None:
    """An experiment file's runs (its `methods` and `seeds` unless given), then its table and plot."""
    (name,) = experiment["scenarios"]
    args = argparse.Namespace(
        **experiment["settings"], methods=methods or experiment["methods"], seeds=seeds or experiment["seeds"]
    )
    results = Results(experiment["results"], experiment["settings"], METHODS)
    if name == "sft":
        data = noisy_gsm8k  # a `noise` share corrupted; the clean rows' corruption is "clean"
        run_sft_like(
            name,
            lambda s: _without(data(args.n_train, 16, args.n_test, args.noise, s), "corruption"),
            gsm8k_accuracy,
            args,
            results,
        )
    elif name == "domain":
        run_sft_like(
            name,
            lambda s: _without(reasoning_gym_mixture(n_test=args.n_test, seed=s), "task"),
            reasoning_gym_accuracy,
            args,
            results,
        )
    else:
        run_pref(args, results)
    _, table, raw = kept(experiment)
    print("\n".join(table_lines(table, raw)))
    if experiment.get("plot"):
        plot_differences(experiment.get("description", name), table, raw, experiment["plot"])


def gap_share(raw, method, metric):
    """(method - stock) / (oracle - stock) of the means over the seeds all three ran on: the share of the gap between
    stock training on the noisy data and on its clean part that the method recovers."""
    base, oracle = baseline_of(method), oracle_of(method)
    if oracle is None or base == method or oracle not in raw or base not in raw:
        return ""
    runs = [raw[n][metric] for n in (method, base, oracle)]
    seeds = [s for s in runs[0] if s in runs[1] and s in runs[2]]
    mine, stock, best = (np.mean([r[s] for s in seeds]) for r in runs)
    return f"{(mine - stock) / (best - stock):+.0%}" if seeds and best != stock else ""


def plot_differences(title, results, raw, path):
    """Per metric: each method's difference from its stock run, one dot per seed and a bar at the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if baseline_of(n) not in (None, n) and baseline_of(n) in raw]
    if not names:
        return
    metrics = list(next(iter(results.values())))
    height = 1.6 + 0.42 * len(names)  # room for the title and the two-line axis label
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), height), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        labels = []
        for i, n in enumerate(names):
            mine, theirs = raw[n][metric], raw[baseline_of(n)][metric]
            diffs = [mine[s] - theirs[s] for s in mine if s in theirs]
            ax.barh(i, np.mean(diffs), color="tab:blue", alpha=0.6)
            ax.plot(diffs, [i] * len(diffs), "k.", ms=5, alpha=0.6)  # see-through: equal seeds show darker
            labels.append(f"{n} - {baseline_of(n)} ({len(diffs)})")  # with its number of paired seeds
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(names)), labels, fontsize=8)
        better = "lower" if metric == "loss" else "higher"
        ax.set_xlabel(f"{metric}: difference from the stock run\nof the same seed ({better} is better)")
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"\n![{title}]({os.path.basename(path)})")


def main(argv=None):
    run_main(argv, __doc__, "benchmarks/experiments/quality/pref96.json")


def _without(splits, column):
    train, holdout, test = splits
    return train.remove_columns(column), holdout, test


if __name__ == "__main__":
    main()
