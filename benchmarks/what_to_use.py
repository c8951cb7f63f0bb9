"""The README's "What to use for which data" table, rebuilt from the kept results by `python -m benchmarks.report`
(block `<!-- report: readme/what_to_use -->` of README.md).

Each row names a kind of data, what to use for it, and what was measured: every number in that cell is read here from
a results file under benchmarks/results/, so the table cannot say more than the runs do. A quality figure is paired
by seed with the uniform (stock) and oracle (clean-only) runs of its own experiment.
"""

from __future__ import annotations

import json
import os

import numpy as np

from benchmarks.run import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percent(share: float, digits: int = 0) -> str:
    return f"{100 * share:.{digits}f} %"


def read_results(path: str) -> dict:
    """A kept results file, by its path from the repository root."""
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


#: The label-noise measures, lower better in each: the clean test loss, and GSM8K's final-answer span loss and
#: probability of ending a solution early (`gsm8k_answer_metrics`); `LOG_MEASURES` are compared as logs.
MEASURES = ("loss", "span_loss", "early_end")
MEASURE_NAMES = {"loss": "clean test loss", "span_loss": "final-answer span loss", "early_end": "ln P(end early)"}
LOG_MEASURES = ("early_end",)


class Pool:
    """The kept runs of one label-noise experiment (`benchmarks/experiments/label_noise/<name>.json`)."""

    def __init__(self, name: str):
        experiment = load_experiment(os.path.join(ROOT, "benchmarks", "experiments", "label_noise", f"{name}.json"))
        self.name, self.runs = name, read_results(experiment["results"])

    def seeds(self, method: str) -> list[str]:
        """The seeds on which `method`, uniform and oracle training all ran."""
        have = [self.runs.get(m, {}) for m in (method, "uniform", "oracle")]
        return sorted(set.intersection(*(set(h) for h in have)), key=int)

    def values(self, method: str, measure: str = "loss", seeds=None) -> np.ndarray:
        seeds = self.seeds(method) if seeds is None else seeds
        if not seeds:
            raise SystemExit(f"{self.name}: no seed on which {method!r}, uniform and oracle all ran.")
        return np.array([self.runs[method][s][measure] for s in seeds])

    def scaled(self, method: str, measure: str = "loss", seeds=None) -> np.ndarray:
        """`values` on the scale a measure is compared on: the log for a probability (`LOG_MEASURES`)."""
        values = self.values(method, measure, seeds)
        return np.log(values) if measure in LOG_MEASURES else values

    def diffs(self, method: str, measure: str = "loss") -> np.ndarray:
        """`method`'s `measure` (by default the clean test loss) minus uniform training's, per seed, on the
        measure's scale (negative: better than uniform)."""
        seeds = self.seeds(method)
        return self.scaled(method, measure, seeds) - self.scaled("uniform", measure, seeds)

    def measures(self) -> list[str]:
        """The measures every oracle run of the pool records, of `MEASURES` (lower is better in each)."""
        runs = self.runs.get("oracle", {}).values()
        return [m for m in MEASURES if runs and all(m in run for run in runs)]

    def ranks(self, measure: str = "loss") -> bool:
        """Whether the pool can rank methods by `measure`: its oracle ran on at least 5 seeds and is better than
        uniform training by at least 3 paired sd."""
        oracle = self.diffs("oracle", measure)
        return oracle.size >= 5 and -oracle.mean() / oracle.std(ddof=1) >= 3

    def gap_share(self, method: str, measure: str = "loss") -> float:
        """The share of the noise gap (uniform minus oracle) of the means that `method` recovered by `measure`, on
        the seeds where all three ran."""
        seeds = self.seeds(method)
        uniform = self.scaled("uniform", measure, seeds).mean()
        return (uniform - self.scaled(method, measure, seeds).mean()) / (
            uniform - self.scaled("oracle", measure, seeds).mean()
        )

    def share(self, method: str, measure: str = "loss") -> str:
        """[`gap_share`] as a percentage."""
        return percent(self.gap_share(method, measure))

    def wins(self, method: str, measure: str = "loss") -> str:
        """On how many of its seeds `method` ended below uniform training by `measure` (the clean test loss)."""
        diffs = self.diffs(method, measure)
        return f"{int((diffs < 0).sum())} of {diffs.size}"

    def losses(self, method: str) -> str:
        """On how many of its seeds `method` ended above uniform training."""
        diffs = self.diffs(method)
        return f"{int((diffs > 0).sum())} of {diffs.size}"

    def diff(self, method: str, measure: str = "loss") -> str:
        """The mean paired difference from uniform training, in nats per token (a log ratio for `LOG_MEASURES`)."""
        return f"{self.diffs(method, measure).mean():+.{1 if measure in LOG_MEASURES else 3}f}"

    def gap(self, measure: str = "loss") -> str:
        """What the noise cost uniform training by `measure`: the oracle's mean paired difference, sign flipped."""
        return f"{-self.diffs('oracle', measure).mean():.{1 if measure in LOG_MEASURES else 3}f}"

    def gap_sd(self, measure: str = "loss") -> str:
        """The oracle's gap in paired standard deviations over its seeds: below 3 the pool cannot rank methods."""
        diffs = self.diffs("oracle", measure)
        return f"{-diffs.mean() / diffs.std(ddof=1):.1f}"

    def noise(self, measure: str = "loss") -> str:
        """What the noise cost uniform training by `measure` and whether that can rank methods: at least 5 seeds and
        3 paired sd (docs/benchmarks.md)."""
        n, sd = self.n("oracle"), float(self.gap_sd(measure))
        verdict = (
            "too few seeds to rank methods"
            if n < 5
            else "enough to rank methods"
            if sd >= 3
            else "too little to rank methods"
        )
        cost = (
            f"raises {MEASURE_NAMES[measure]} by {self.gap(measure)}"
            if measure in LOG_MEASURES
            else f"costs uniform training {self.gap(measure)} nats/token"
        )
        return f"the noise {cost}, {sd:.1f} paired sd over {n} seeds: {verdict}"

    def goal(self, method: str, measure: str = "loss") -> dict:
        """The SFT default's goal for `method` by `measure` (docs/benchmarks.md): where the pool ranks methods by it,
        better than uniform on at least 80 % of the seeds and at least 50 % of the gap recovered; everywhere, never
        worse than uniform by more than one paired sd. `verdict` is "met", "missed" or "none" (the oracle is no better
        than uniform by this measure, which then does not see the noise); the rest are its figures."""
        diffs, share = self.diffs(method, measure), self.gap_share(method, measure)
        ratio = diffs.mean() / diffs.std(ddof=1) if diffs.size > 1 else float("nan")
        rankable = self.ranks(measure)
        met = ratio <= 1 and (not rankable or ((diffs < 0).mean() >= 0.8 and share >= 0.5))
        verdict = "none" if self.diffs("oracle", measure).mean() >= 0 else "met" if met else "missed"
        return {"verdict": verdict, "rankable": rankable, "ratio": ratio, "share": share, "diffs": diffs}

    def meets_goal(self, method: str) -> bool:
        """Whether `method` met the goal on every measure that sees the noise, by at least one measure that ranks
        methods, over at least 5 seeds."""
        if method not in self.runs or self.n(method) < 5:
            return False
        goals = [self.goal(method, measure) for measure in self.measures()]
        return all(g["verdict"] != "missed" for g in goals) and any(
            g["verdict"] == "met" and g["rankable"] for g in goals
        )

    def mean(self, method: str, key: str) -> str:
        """The mean over `method`'s runs of a recorded `key` (e.g. `noisy_share_trained`)."""
        return percent(np.mean([run[key] for run in self.runs[method].values()]), digits=1)

    def n(self, method: str) -> int:
        return len(self.seeds(method))


class Pairs:
    """The kept runs of the 96 half-flipped GSM8K pairs (`benchmarks/experiments/quality/pref96.json`)."""

    def __init__(self):
        experiment = load_experiment(os.path.join(ROOT, "benchmarks", "experiments", "quality", "pref96.json"))
        self.runs = read_results(experiment["results"])["pref"]

    def accuracy(self, method: str) -> str:
        return f"{np.mean(list(self.runs[method]['accuracy'].values())):.2f}"

    def wins(self, method: str, stock: str) -> str:
        ours, theirs = self.runs[method]["accuracy"], self.runs[stock]["accuracy"]
        seeds = [s for s in ours if s in theirs]
        return f"{sum(ours[s] > theirs[s] for s in seeds)} of {len(seeds)}"


def scoring_cost_ratio() -> str:
    """Scoring with SmolLM2-135M over scoring with Qwen2.5-Coder-0.5B (`benchmarks.scorer_cost`)."""
    cost = read_results("benchmarks/results/scorer_cost.json")
    ratio = (
        cost["smollm2-135m-instruct"]["scoring_seconds_per_1k"]
        / cost["qwen2.5-coder-0.5b-instruct"]["scoring_seconds_per_1k"]
    )
    return f"{ratio:.2f}"


def ran(pool: Pool, method: str, say) -> str:
    """`say()` where `method` ran on a seed with uniform and oracle training of its pool, else that it has not."""
    return say() if method in pool.runs and pool.n(method) else f"no run kept yet (`{method}`)"


def seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def rows() -> list[tuple[str, str, str]]:
    """`(your data, use, measured)` per row of the README's table."""
    other, shuffled, mixture = Pool("other_task"), Pool("shuffled"), Pool("mixture")
    gsm8k, answer, trained = Pool("gsm8k"), Pool("gsm8k_answer"), Pool("trained_05b")
    pairs = Pairs()

    def early(method: str) -> str:  # GSM8K: ln P(end early) and the full-answer loss against uniform training
        return ran(
            answer,
            method,
            lambda: (
                f"ln P(end early) {answer.diff(method, 'early_end')} (lower on {answer.wins(method, 'early_end')}"
                f" seeds), full-answer loss {answer.diff(method)} ({answer.wins(method)} lower)"
            ),
        )

    out = [
        (
            "SFT rows with wrong labels of the wrong kind (another task's or source's answers)",
            "the SFT defaults (rows drawn by `holdout_posterior` weights)",
            ran(
                other,
                "ica_sampling",
                lambda: (
                    f"{other.share('ica_sampling')} of the gap to clean-only training recovered, better than "
                    f"uniform on {other.wins('ica_sampling')} seeds, "
                    f"{other.mean('ica_sampling', 'noisy_share_trained')} noisy rows trained"
                ),
            )
            + "; "
            + ran(
                other,
                "shuffled_sampling",
                lambda: f"the same weights dealt to other rows better on {other.wins('shuffled_sampling')}",
            )
            + f'; loss weights (`ica_weight_mode="loss"`) {other.share("ica_turns_quantile")} '
            f"({other.wins('ica_turns_quantile')}), the paper's settings {other.share('ica')}",
        ),
        (
            "preference pairs with flipped labels",
            "the DPO/SimPO defaults (batch min-max loss weights)",
            f"DPO pair accuracy {pairs.accuracy('ica_dpo_conditioned_turns')} against {pairs.accuracy('dpo')} stock "
            f"({pairs.wins('ica_dpo_conditioned_turns', 'dpo')} seeds); SimPO "
            f"{pairs.accuracy('ica_simpo_conditioned_turns')} against {pairs.accuracy('simpo')} "
            f"({pairs.wins('ica_simpo_conditioned_turns', 'simpo')}); random weights of the same spread "
            f"{pairs.accuracy('random_dpo')} and {pairs.accuracy('random_simpo')}",
        ),
        (
            "a pool mixing tasks, holdout of the one you want",
            "select, do not weight: `trl-ica score`, then `trl-ica select`",
            f"top half beat uniform on {mixture.wins('top_turns')} seeds, {mixture.share('top_turns')} of the gap "
            f"(by Qwen2.5-Coder-0.5B's scores {mixture.wins('top_qwen_turns')}, {mixture.share('top_qwen_turns')}); "
            "the SFT defaults "
            + ran(
                mixture,
                "ica_sampling",
                lambda: f"{mixture.share('ica_sampling')} ({mixture.wins('ica_sampling')})",
            )
            + f", loss weights {mixture.share('ica_turns_quantile')}, or "
            f"{mixture.share('qwen_turns_quantile')} scored by the 0.5B model",
        ),
        (
            "SFT answers wrong but of the right kind (another question's number)",
            'a larger scoring model: `ica_scoring_model` with `ica_weight_mode="loss"`',
            f"scored by Qwen2.5-Coder-0.5B, {shuffled.wins('qwen_turns_quantile')} seeds better than uniform, "
            f"{shuffled.share('qwen_turns_quantile')} of the gap; the 135M model's own scores as loss weights "
            f"{shuffled.wins('ica_turns_quantile')}, {shuffled.share('ica_turns_quantile')}, drawing rows by them "
            "(the SFT defaults) "
            + ran(
                shuffled,
                "ica_sampling",
                lambda: f"{shuffled.wins('ica_sampling')}, {shuffled.share('ica_sampling')}",
            )
            + " (the same weights dealt to other rows "
            + ran(
                shuffled,
                "shuffled_sampling",
                lambda: f"{shuffled.wins('shuffled_sampling')}, {shuffled.share('shuffled_sampling')}",
            )
            + f"); {shuffled.noise()}",
        ),
        (
            "SFT label noise of the wrong kind, scoring cost to save",
            'a smaller scoring model (`ica_scoring_model`, `ica_weight_mode="loss"`)',
            f"Qwen2.5-Coder-0.5B trained with SmolLM2-135M's weights: {trained.share('smol_turns_quantile')} of the "
            f"gap, {trained.wins('smol_turns_quantile')} seeds better than uniform (its own scores "
            f"{trained.share('ica_turns_quantile')}, {trained.wins('ica_turns_quantile')}); scoring with the 135M "
            f"model costs {scoring_cost_ratio()} of scoring with the 0.5B",
        ),
        (
            "GSM8K solutions with a wrong final number, another problem's solution or half of one (30 %)",
            gsm8k_use(answer),
            f"by the full-answer loss {answer.noise()}; by ending a solution early {answer.noise('early_end')}. "
            "Drawing rows by weight (the defaults): "
            f'{early("ica_sampling")}; by the last line\'s score (`ica_score_span="last_line"`): '
            f"{early('lastline_sampling')}"
            + ran(
                answer,
                "lastline_sampling",
                lambda: f", {answer.share('lastline_sampling', 'early_end')} of the early-ending gap",
            )
            + "; the same weights dealt to other rows: "
            f"{early('shuffled_lastline_sampling')}; by the final-answer line's (`ica_score_span`): "
            f"{early('span_sampling')}; loss weights {gsm8k.diff('ica_turns_quantile')}, worse on "
            f"{gsm8k.losses('ica_turns_quantile')}, as random weights ({gsm8k.diff('random_weights')}); token masks "
            f"{answer.diff('token_mask')} ({seeds(answer.n('token_mask'))})",
        ),
    ]
    return out


def gsm8k_use(answer: Pool) -> str:
    """What the README's table says to use on GSM8K-like data (solutions that end in a final answer line): the first
    way of drawing rows that met the SFT default's goal on the pool over 5 seeds or more, else neither."""
    if answer.meets_goal("ica_sampling"):
        return "the SFT defaults"
    if answer.meets_goal("lastline_sampling"):
        return 'the SFT defaults with `ica_score_span="last_line"` (rows drawn by the last line\'s score)'
    return "the SFT defaults, or stock SFT: neither is measured better"


#: The pools and methods the SFT default is chosen between: `(pool label, experiment, method label, method)`. The
#: last-line score is a candidate where answers run over several lines; where every answer is one line (the
#: reasoning-gym pools) it is the row score request for request (tests/test_span.py), so the default's runs stand.
GOAL_ROWS = (
    ("another task's answers", "other_task", "sampling", "ica_sampling"),
    ("another task's answers", "other_task", "loss weights", "ica_turns_quantile"),
    ("other questions' answers", "shuffled", "sampling", "ica_sampling"),
    ("other questions' answers", "shuffled", "loss weights", "ica_turns_quantile"),
    ("the task mixture", "mixture", "sampling", "ica_sampling"),
    ("the task mixture", "mixture", "loss weights", "ica_turns_quantile"),
    ("GSM8K corrupted answers", "gsm8k_answer", "sampling", "ica_sampling"),
    ("GSM8K corrupted answers", "gsm8k_answer", 'sampling, `ica_score_span="last_line"`', "lastline_sampling"),
    ("GSM8K corrupted answers", "gsm8k", "loss weights", "ica_turns_quantile"),
)


def goal_table() -> list[str]:
    """The SFT default's goal, checked per pool for the two ways of spending the recommended score (sampling by
    `holdout_posterior` weights, the default; `holdout_quantile` loss weights), on each measure the pool records:
    where the oracle's gap is at least 3 paired sd over at least 5 seeds, better than uniform on at least 80 % of the
    seeds and at least 50 % of the gap recovered; on every pool and measure, never worse than uniform by more than one
    paired sd. A measure by which the oracle is no better than uniform training does not see the noise, and sets no
    goal (for `docs/benchmarks.md`)."""
    lines = [
        "| pool | the recommended score as | measure | seeds | share of the gap | better than uniform | difference "
        "from uniform, in paired sd | oracle's gap, in paired sd (seeds) | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    pools = {}
    for label, name, how, method in GOAL_ROWS:
        pool = pools.setdefault(name, Pool(name))
        if method not in pool.runs or not pool.seeds(method):
            lines.append(f"| {label} | {how} | | 0 | | | | | not run |")
            continue
        for measure in pool.measures():
            g = pool.goal(method, measure)
            diffs = g["diffs"]
            goal = g["verdict"] + ("" if g["rankable"] else " (not rankable: only the bound applies)")
            if g["verdict"] == "none":  # removing the noise does not improve it: not its measure
                goal = "none: the oracle is no better than uniform by this measure"
            lines.append(
                f"| {label} | {how} | {MEASURE_NAMES[measure]} | {diffs.size} | {percent(g['share'])} | "
                f"{pool.wins(method, measure)} | {g['ratio']:+.1f} | {pool.gap_sd(measure)} "
                f"({pool.n('oracle')}) | {goal} |"
            )
    return lines


def results_table() -> list[str]:
    """The README's table, for `python -m benchmarks.report`."""
    lines = ["| your data | use | measured |", "|---|---|---|"]
    return lines + [f"| {data} | {use} | {measured} |" for data, use, measured in rows()]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("\n".join(results_table()) + "\n\n" + "\n".join(goal_table()))


if __name__ == "__main__":
    main()
