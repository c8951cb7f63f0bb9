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


def _read(path: str) -> dict:
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


class Pool:
    """The kept runs of one label-noise experiment (`benchmarks/experiments/label_noise/<name>.json`)."""

    def __init__(self, name: str):
        experiment = load_experiment(os.path.join(ROOT, "benchmarks", "experiments", "label_noise", f"{name}.json"))
        self.runs = _read(experiment["results"])

    def seeds(self, method: str) -> list[str]:
        """The seeds on which `method`, uniform and oracle training all ran."""
        have = [self.runs.get(m, {}) for m in (method, "uniform", "oracle")]
        return sorted(set.intersection(*(set(h) for h in have)), key=int)

    def values(self, method: str, measure: str = "loss", seeds=None) -> np.ndarray:
        return np.array([self.runs[method][s][measure] for s in seeds or self.seeds(method)])

    def diffs(self, method: str) -> np.ndarray:
        """`method`'s clean test loss minus uniform training's, per seed (negative: better than uniform)."""
        seeds = self.seeds(method)
        return self.values(method, seeds=seeds) - self.values("uniform", seeds=seeds)

    def share(self, method: str) -> str:
        """The share of the noise gap (uniform minus oracle) of the means that `method` recovered."""
        seeds = self.seeds(method)
        uniform, oracle = self.values("uniform", seeds=seeds).mean(), self.values("oracle", seeds=seeds).mean()
        return percent((uniform - self.values(method, seeds=seeds).mean()) / (uniform - oracle))

    def wins(self, method: str) -> str:
        """On how many of its seeds `method` ended below uniform training's clean test loss."""
        diffs = self.diffs(method)
        return f"{int((diffs < 0).sum())} of {diffs.size}"

    def losses(self, method: str) -> str:
        """On how many of its seeds `method` ended above uniform training."""
        diffs = self.diffs(method)
        return f"{int((diffs > 0).sum())} of {diffs.size}"

    def diff(self, method: str) -> str:
        """The mean paired difference from uniform training, in nats per token."""
        return f"{self.diffs(method).mean():+.3f}"

    def gap(self) -> str:
        """What the noise cost uniform training: the oracle's mean paired difference, sign flipped."""
        return f"{-self.diffs('oracle').mean():.3f}"

    def gap_sd(self) -> str:
        """The oracle's gap in paired standard deviations over its seeds: below 3 the pool cannot rank methods."""
        diffs = self.diffs("oracle")
        return f"{-diffs.mean() / diffs.std(ddof=1):.1f}"

    def mean(self, method: str, key: str) -> str:
        """The mean over `method`'s runs of a recorded `key` (e.g. `noisy_share_trained`)."""
        return percent(np.mean([run[key] for run in self.runs[method].values()]), digits=1)

    def n(self, method: str) -> int:
        return len(self.seeds(method))


class Pairs:
    """The kept runs of the 96 half-flipped GSM8K pairs (`benchmarks/experiments/quality/pref96.json`)."""

    def __init__(self):
        experiment = load_experiment(os.path.join(ROOT, "benchmarks", "experiments", "quality", "pref96.json"))
        self.runs = _read(experiment["results"])["pref"]

    def accuracy(self, method: str) -> str:
        return f"{np.mean(list(self.runs[method]['accuracy'].values())):.2f}"

    def wins(self, method: str, stock: str) -> str:
        ours, theirs = self.runs[method]["accuracy"], self.runs[stock]["accuracy"]
        seeds = [s for s in ours if s in theirs]
        return f"{sum(ours[s] > theirs[s] for s in seeds)} of {len(seeds)}"


def scoring_cost_ratio() -> str:
    """Scoring with SmolLM2-135M over scoring with Qwen2.5-Coder-0.5B (`benchmarks.scorer_cost`)."""
    cost = _read("benchmarks/results/scorer_cost.json")
    ratio = (
        cost["smollm2-135m-instruct"]["scoring_seconds_per_1k"]
        / cost["qwen2.5-coder-0.5b-instruct"]["scoring_seconds_per_1k"]
    )
    return f"{ratio:.2f}"


def rows() -> list[tuple[str, str, str]]:
    """`(your data, use, measured)` per row of the README's table."""
    other, shuffled, mixture = Pool("other_task"), Pool("shuffled"), Pool("mixture")
    gsm8k, answer, trained = Pool("gsm8k"), Pool("gsm8k_answer"), Pool("trained_05b")
    pairs = Pairs()
    out = [
        (
            "SFT rows with wrong labels of the wrong kind (another task's or source's answers)",
            "the SFT defaults",
            f"{other.share('ica_turns_quantile')} of the gap to clean-only training recovered, better than uniform "
            f"on {other.wins('ica_turns_quantile')} seeds; the paper's settings {other.share('ica')}",
        ),
        (
            "the same, one pool measured so far",
            '`ica_weight_mode="sampling"` (the rows drawn by `holdout_posterior` weights)',
            f"{other.share('ica_sampling')} of the gap, better than uniform on {other.wins('ica_sampling')} seeds, "
            f"{other.mean('ica_sampling', 'noisy_share_trained')} noisy rows trained; its control (the same weights "
            f"dealt to other rows) better on {other.wins('shuffled_sampling')}",
        ),
        (
            "preference pairs with flipped labels",
            "the DPO/SimPO defaults",
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
            f"weights {mixture.share('ica_turns_quantile')}, or {mixture.share('qwen_turns_quantile')} scored by "
            f"the 0.5B model",
        ),
        (
            "SFT answers wrong but of the right kind (another question's number)",
            "a larger scoring model: the SFT defaults with `ica_scoring_model`",
            f"scored by Qwen2.5-Coder-0.5B, {shuffled.wins('qwen_turns_quantile')} seeds better than uniform, "
            f"{shuffled.share('qwen_turns_quantile')} of the gap; the 135M model's own scores "
            f"{shuffled.wins('ica_turns_quantile')}, {shuffled.share('ica_turns_quantile')}",
        ),
        (
            "SFT label noise of the wrong kind, scoring cost to save",
            "a smaller scoring model (`ica_scoring_model`)",
            f"Qwen2.5-Coder-0.5B trained with SmolLM2-135M's weights: {trained.share('smol_turns_quantile')} of the "
            f"gap, {trained.wins('smol_turns_quantile')} seeds better than uniform (its own scores "
            f"{trained.share('ica_turns_quantile')}, {trained.wins('ica_turns_quantile')}); scoring with the 135M "
            f"model costs {scoring_cost_ratio()} of scoring with the 0.5B",
        ),
        (
            "GSM8K solutions with a wrong final number, another problem's solution or half of one (30 %)",
            "stock SFT (the 135M model's own weights lost)",
            f"weights worse than uniform on {gsm8k.losses('ica_turns_quantile')} seeds, "
            f"{gsm8k.losses('ica_turns_quantile_wmean')} with `weighted_mean` (the noise cost {gsm8k.gap()} "
            f"nats/token; the weights {gsm8k.diff('ica_turns_quantile')}, random weights "
            f"{gsm8k.diff('random_weights')}); sampling by weight better on {answer.wins('ica_sampling')} seeds, "
            f"its control on {answer.wins('shuffled_sampling')}; token masks {answer.diff('token_mask')} "
            f"({answer.n('token_mask')} seed{'s' if answer.n('token_mask') > 1 else ''})",
        ),
    ]
    return out


def results_table() -> list[str]:
    """The README's table, for `python -m benchmarks.report`."""
    lines = ["| your data | use | measured |", "|---|---|---|"]
    return lines + [f"| {data} | {use} | {measured} |" for data, use, measured in rows()]


if __name__ == "__main__":
    print("\n".join(results_table()))
