"""Tables of docs/benchmarks.md that compare methods of the label-noise experiments side by side, rebuilt from their
results files by `python -m benchmarks.report` (blocks `<!-- report: view/<name> -->`).

Each experiment's own table (`<!-- report: label_noise/<name> -->`) lists all its methods; a view picks the rows one
question needs, from one experiment or across several, so that no number of such a comparison is typed by hand.
"""

from __future__ import annotations

import numpy as np

from benchmarks.what_to_use import Pool, percent, read_results

#: The "Dividing by the weights" comparison: `(row label, experiment, recommended method, its weighted_mean twin,
#: random-weights method or None, its weighted_mean twin or None)`.
WEIGHTED_MEAN_ROWS = (
    (
        "answers of another task",
        "other_task",
        "ica_turns_quantile",
        "ica_turns_quantile_wmean",
        "random_weights",
        "random_weights_wmean",
    ),
    (
        "answers of other questions",
        "shuffled",
        "ica_turns_quantile",
        "ica_turns_quantile_wmean",
        "random_weights",
        "random_weights_wmean",
    ),
    (
        "the task mixture",
        "mixture",
        "ica_turns_quantile",
        "ica_turns_quantile_wmean",
        "random_weights",
        "random_weights_wmean",
    ),
    (
        "the task mixture, Qwen2.5-Coder-0.5B's scores",
        "mixture",
        "qwen_turns_quantile",
        "qwen_turns_quantile_wmean",
        None,
        None,
    ),
    (
        "GSM8K, wrong, mismatched or truncated answers",
        "gsm8k",
        "ica_turns_quantile",
        "ica_turns_quantile_wmean",
        "random_weights",
        "random_weights_wmean",
    ),
    (
        "Qwen2.5-Coder-0.5B trained on another task's answers, its own scores",
        "trained_05b",
        "ica_turns_quantile",
        "ica_turns_quantile_wmean",
        None,
        None,
    ),
    (
        "the same model trained, SmolLM2-135M's scores",
        "trained_05b",
        "smol_turns_quantile",
        "smol_turns_quantile_wmean",
        None,
        None,
    ),
)

#: The scoring-model comparisons: per experiment, `(row label, method, the score whose AUROC the row shows)`.
SCORING_MODEL_ROWS = {
    "shuffled": (
        ("uniform", "uniform", None),
        ("oracle (clean rows only)", "oracle", None),
        ("weights, SmolLM2-135M's own scores", "ica_turns_quantile", "turns_conditioned"),
        ("weights, Qwen2.5-Coder-0.5B's scores", "qwen_turns_quantile", "qwen_turns_conditioned"),
        ("the same, `weighted_mean`", "qwen_turns_quantile_wmean", "qwen_turns_conditioned"),
        ("top half by SmolLM2-135M's scores", "top_turns", "turns_conditioned"),
        ("top half by Qwen2.5-Coder-0.5B's scores", "top_qwen_turns", "qwen_turns_conditioned"),
    ),
    "mixture": (
        ("uniform", "uniform", None),
        ("oracle (target rows only)", "oracle", None),
        ("weights, SmolLM2-135M's own scores", "ica_turns_quantile", "turns_conditioned"),
        ("weights, Qwen2.5-Coder-0.5B's scores", "qwen_turns_quantile", "qwen_turns_conditioned"),
        ("the same, `weighted_mean`", "qwen_turns_quantile_wmean", "qwen_turns_conditioned"),
        ("top half by SmolLM2-135M's scores", "top_turns", "turns_conditioned"),
        ("top half by Qwen2.5-Coder-0.5B's scores", "top_qwen_turns", "qwen_turns_conditioned"),
    ),
}


def _share_cell(pool: Pool, method: str) -> str:
    return f"{pool.values(method).mean():.3f} ({pool.share(method)}, {pool.wins(method)})"


def weighted_mean_table() -> list[str]:
    """Clean test loss with `token_mean` and `weighted_mean`, recommended and random weights, per experiment: the
    mean over the seeds, the share of the noise gap of the means and the seeds better than uniform training."""
    lines = [
        "| experiment (noise gap) | recommended, `token_mean` | recommended, `weighted_mean` | `weighted_mean` "
        "better on | random, `token_mean` | random, `weighted_mean` |",
        "|---|---|---|---|---|---|",
    ]
    pools = {}
    for label, name, ours, ours_w, rand, rand_w in WEIGHTED_MEAN_ROWS:
        pool = pools.setdefault(name, Pool(name))
        seeds = [s for s in pool.seeds(ours) if s in pool.runs.get(ours_w, {})]
        better = sum(pool.runs[ours_w][s]["loss"] < pool.runs[ours][s]["loss"] for s in seeds)
        cells = [_share_cell(pool, ours), _share_cell(pool, ours_w), f"{better} of {len(seeds)} seeds"]
        cells += [_share_cell(pool, m) if m else "" for m in (rand, rand_w)]
        lines.append(f"| {label} (gap {pool.gap()}) | " + " | ".join(cells) + " |")
    note = (
        "(Each cell: mean clean test loss, share of the noise gap of the means, seeds better than uniform training; "
        "rebuilt by `python -m benchmarks.report`.)"
    )
    return [*lines, "", note]


def scoring_model_table(name: str) -> list[str]:
    """The methods of one experiment that compare the trained model's own scores with a larger scoring model's."""
    pool = Pool(name)
    gaps = -pool.diffs("oracle")
    # a seed whose noise cost nearly nothing makes its share meaningless: then only the share of the means
    per_seed_shown = gaps.min() >= 0.1 * gaps.mean()
    shown = "per seed / of the means" if per_seed_shown else "of the means"
    lines = [
        f"| method | clean test loss | share of the noise gap: {shown} | better than uniform | AUROC of the scores |",
        "|---|---|---|---|---|",
    ]
    for label, method, score in SCORING_MODEL_ROWS[name]:
        loss = pool.values(method).mean()
        if method == "uniform":
            lines.append(f"| {label} | {loss:.3f} | | | |")
            continue
        seeds = pool.seeds(method)
        uniform, oracle = pool.values("uniform", seeds=seeds), pool.values("oracle", seeds=seeds)
        per_seed = (uniform - pool.values(method, seeds=seeds)) / (uniform - oracle)
        shares = "" if method == "oracle" else pool.share(method)
        if per_seed_shown and method != "oracle":
            shares = f"{percent(per_seed.mean())} ± {100 * per_seed.std():.0f} / {shares}"
        auroc = f"{np.mean(list(pool.runs[f'auroc {score}'].values())):.3f}" if score else ""
        lines.append(f"| {label} | {loss:.3f} | {shares} | {pool.wins(method)} | {auroc} |")
    return lines


#: The end-to-end comparison with the paper: `(scenario, the paper's win rate, quality scenario, metric, [(label,
#: method)], control method or None)`; each method is paired by seed with the scenario's stock run.
PAPER_ROWS = (
    (
        "SFT on noisy GSM8K, weights (R = 1 / online / conditioned form)",
        "71-85 %",
        "sft",
        "loss",
        ("ica", "ica_online", "ica_conditioned"),
        "random_weights",
    ),
    (
        "SFT on noisy GSM8K, top half by the ICA score / the conditioned score (selection)",
        "(hard filtering did worse than weights)",
        "sft",
        "loss",
        ("top_half_ica", "top_half_conditioned"),
        None,
    ),
    (
        "domain shift, weights (R = 1 / online / conditioned form)",
        "",
        "domain",
        "loss",
        ("ica", "ica_online", "ica_conditioned"),
        "random_weights",
    ),  # fmt: skip
    (
        "domain shift, top half by the ICA score / the conditioned score",
        "",
        "domain",
        "loss",
        ("top_half_ica", "top_half_conditioned"),
        None,
    ),
    (
        "DPO on pairs with half the labels flipped (paper's score / conditioned form)",
        "61-80 %",
        "pref",
        "accuracy",
        ("ica_dpo", "ica_dpo_conditioned"),
        None,
    ),
    (
        "SimPO on the same pairs (paper's score / conditioned form)",
        "62-94 %",
        "pref",
        "accuracy",
        ("ica_simpo", "ica_simpo_conditioned"),
        None,
    ),
)


def paper_table() -> list[str]:
    """The quality experiments next to the paper's win rates: per scenario, the seeds on which each method did better
    than the stock run of the same seed and its mean paired difference (loss: lower is better; pair accuracy:
    higher), from `benchmarks/results/quality.json`."""
    from benchmarks.quality import baseline_of

    runs = read_results("benchmarks/results/quality.json")
    lines = [
        "| scenario | the paper (win rate against stock training) | measured here: seeds better than stock; mean "
        "paired difference |",
        "|---|---|---|",
    ]
    for label, paper, scenario, metric, methods, control in PAPER_ROWS:
        wins, diffs = [], []
        for method in (*methods, *([control] if control else [])):
            ours, stock = runs[scenario][method][metric], runs[scenario][baseline_of(method)][metric]
            seeds = [s for s in ours if s in stock]
            d = np.array([ours[s] - stock[s] for s in seeds])
            wins.append(f"{int(((d < 0) if metric == 'loss' else (d > 0)).sum())} of {len(seeds)}")
            diffs.append(f"{d.mean():+.3f}")
        n = len(methods)
        cell = (
            f"{' / '.join(wins[:n])}; {'test loss' if metric == 'loss' else 'pair accuracy'} {' / '.join(diffs[:n])}"
        )
        if control:
            cell += f"; random weights {wins[n]}, {diffs[n]}"
        lines.append(f"| {label} | {paper} | {cell} |")
    return lines


#: The ranking table of docs/scores.md: `(row label, label-noise experiment)`, the label completed with the pool's
#: noisy share (`{noise}`); its columns are `AUROC_COLUMNS`.
AUROC_ROWS = (
    ("one-digit sums, {noise} answered with another task's answers", "other_task"),
    ("one-digit sums, {noise} answered with other questions' answers", "shuffled"),
    ("reasoning-gym mixture: the target task, {noise} of the rows four other tasks", "mixture"),
    ("GSM8K, {noise} with a wrong final number, another problem's solution or half of one", "gsm8k"),
)
#: `(column header, the results key of its AUROC per seed)`.
AUROC_COLUMNS = (
    ("in-turn: difference, sum (paper)", "auroc paper"),
    ("in-turn: conditioned, mean", "auroc conditioned"),
    ("plain loss, mean", "auroc loss"),
    ("turns: difference, sum", "auroc turns_paper"),
    ("turns: conditioned, mean (the default)", "auroc turns_conditioned"),
)
#: The preference row: `(column header, the label of its row in benchmarks/results/preference.json)`.
PREFERENCE_AUROC = {
    "in-turn: difference, sum (paper)": "ICA margin change, sum over tokens (the paper's)",
    "in-turn: conditioned, mean": "conditioned margin per token",
    "plain loss, mean": "model margin per token",
}


#: The block of docs/scores.md that `auroc_table` fills.
AUROC_VIEW = "view/auroc"


def auroc_table() -> list[str]:
    """How well each score puts the clean rows first (AUROC, 0.5 = chance; fixed demonstrations, k = 3): per
    label-noise pool the mean over the seeds kept (their number in brackets), and the preference pairs of
    `benchmarks.preference`; the best of each row in bold."""
    header = [h for h, _ in AUROC_COLUMNS]
    lines = ["| data | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]

    def row(label, cells):
        best = max((v for v, _ in cells if v is not None), default=None)
        text = [
            "" if v is None else (f"**{v:.3f}**" if v == best else f"{v:.3f}") + (f" ({n})" if n else "")
            for v, n in cells
        ]
        lines.append(f"| {label} | " + " | ".join(text) + " |")

    for label, name in AUROC_ROWS:
        runs = Pool(name).runs
        label = label.format(noise=percent(runs["settings"]["noise"]))
        cells = []
        for _, key in AUROC_COLUMNS:
            per_seed = list(runs.get(key, {}).values())
            cells.append((float(np.mean(per_seed)), len(per_seed)) if per_seed else (None, 0))
        row(label, cells)
    quality = read_results("benchmarks/results/preference.json")["quality"]
    by_label = {label: value for label, _, value in quality["rows"]}
    cells = []
    for header_cell, _ in AUROC_COLUMNS:
        label = PREFERENCE_AUROC.get(header_cell)
        match = [v for k, v in by_label.items() if label is not None and k.startswith(label)]
        cells.append((match[0], 0) if match else (None, 0))
    row(f"GSM8K preference pairs, {percent(quality['flipped'])} flipped: correct against flipped (margins)", cells)
    return lines


def tables() -> dict[str, list[str]]:
    """`{block key: lines}` of every view of docs/benchmarks.md (docs/scores.md's: `AUROC_VIEW`)."""
    out = {"view/weighted_mean": weighted_mean_table(), "view/paper": paper_table()}
    out.update({f"view/scoring_model/{name}": scoring_model_table(name) for name in SCORING_MODEL_ROWS})
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    for key, lines in {**tables(), AUROC_VIEW: auroc_table()}.items():
        print(f"{key}:\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
