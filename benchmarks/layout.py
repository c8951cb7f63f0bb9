"""How the conditioned request is laid out, and which tokens are scored: AUROC of each choice on labelled pools.

The same rows are scored in three layouts and with or without the token that closes each response:
- `in_turn`: conversational rows, the demonstrations and the question in one user turn with the paper's wording
  (`ica_demo_layout="in_turn"`);
- `turns`: conversational rows, each demonstration an earlier user/assistant exchange before the row's unchanged
  turn (`ica_demo_layout="turns"`, the default): the requests with and without demonstrations differ by the
  demonstrations alone;
- `standard`: the same rows as standard prompt/completion text (`"{question}\\nAnswer: "`), plain few-shot demos;
- `end` / `no_end`: `ica_score_end_token` True / False (the chat template's end of turn, or EOS).

For each, the AUROC (larger score = the rows that matter) of the paper's score (difference, sum), the difference
per token and the conditioned form per token. Pools (k = 3 kNN demonstrations):
- `label_noise`: the label-noise benchmark's pool, one-digit arithmetic with half the answers taken from
  family_relationships (clean vs noisy);
- `label_noise_shuffled`: the same with half the answers those of other arithmetic questions;
- `mixture`: a reasoning-gym task mixture, target task (leg counting) vs the rest;
- `gsm8k`: noisy GSM8K, clean vs corrupted (wrong final number, another problem's solution, truncated);
- `pairs`: GSM8K preference pairs, correct vs flipped.

    python -m benchmarks.run benchmarks/experiments/layout/smollm2.json [--methods ...] [--seeds 0]

The experiment's `settings` are the pool size `n` (pairs: half of it), `demo_selection` and the scoring `model`; its
methods are the variants (`turns/end`, ...), its scenarios the pools. Every finished (pool, variant, seed) is kept
in the results file (written whole) and skipped when run again; a file made with other settings is refused.
"""

import warnings
from types import SimpleNamespace

import numpy as np
from datasets import Dataset

from benchmarks.common.data import reasoning_gym_mixture
from benchmarks.common.models import load_model, model_path
from benchmarks.common.pools import pool_table, run_pools
from benchmarks.label_noise import make_data
from benchmarks.run import main as run_main
from trl_ica.cli.scenarios import auroc, noisy_gsm8k, noisy_gsm8k_pairs
from trl_ica.scoring.ica import score_ica
from trl_ica.scoring.options import ICAScoringOptions

warnings.filterwarnings("ignore")
SCENARIOS = ("label_noise", "label_noise_shuffled", "mixture", "gsm8k", "pairs")
VARIANTS = tuple(f"{layout}/{end}" for layout in ("in_turn", "turns", "standard") for end in ("end", "no_end"))


def pool(name, n, seed):
    """(train, holdout, positive): `n` rows (pairs: `n // 2`), a clean holdout, and which rows are the ones that
    matter."""
    if name.startswith("label_noise"):
        kind = "shuffled" if name.endswith("shuffled") else "other_task"
        args = SimpleNamespace(
            task="basic_arithmetic",
            noise_task="family_relationships",
            noise=0.5,
            noise_kind=kind,
            n_train=n,
            n_holdout=32,
            n_test=0,
        )
        train, kinds, holdout, _, _ = make_data(args, seed)
        return train, holdout, kinds == "clean"
    if name == "mixture":
        train, holdout, _ = reasoning_gym_mixture(n_per_task=n // 5, n_holdout=16, n_test=0, seed=seed)
        return train.remove_columns("task"), holdout, np.array(train["task"]) == "leg_counting"
    if name == "gsm8k":
        train, holdout, _ = noisy_gsm8k(n_train=n, n_holdout=16, n_test=0, noise=0.5, seed=seed)
        return train.remove_columns("corruption"), holdout, np.array(train["corruption"]) == "clean"
    train, holdout, _ = noisy_gsm8k_pairs(n_train=n // 2, n_holdout=16, n_test=0, flip=0.5, seed=seed)
    return train.remove_columns("flipped"), holdout, ~np.array(train["flipped"])


def as_standard(dataset: Dataset) -> Dataset:
    """Conversational prompt/completion or preference rows as standard text rows."""

    def convert(row):
        out = {"prompt": f"{row['prompt'][-1]['content']}\nAnswer: "}
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                out[key] = row[key][-1]["content"]
        return out

    return dataset.map(convert, remove_columns=dataset.column_names)


METHODS = VARIANTS
SCORES = ("difference_sum", "difference_mean", "conditioned_mean")  # the AUROC each record keeps
SETTING_KEYS = ("n", "demo_selection", "model")


def run_experiment(experiment: dict, methods=None, seeds=None, keep_logs="") -> None:
    """An experiment file's scorings (its `methods` and `seeds` unless given), each kept as it finishes; then its
    table."""
    settings = experiment["settings"]
    if set(settings) != set(SETTING_KEYS):
        raise SystemExit(f"layout settings are {list(SETTING_KEYS)}, got {sorted(settings)}.")
    model, tokenizer = load_model(model_path(settings["model"]))

    def measure(data, variant, seed):
        train, holdout, positive = data
        layout, end = variant.split("/")
        if layout == "standard":
            train, holdout = as_standard(train), as_standard(holdout)
        result = score_ica(
            model,
            tokenizer,
            train,
            holdout,
            ICAScoringOptions(
                num_demos=3,
                demo_selection=settings["demo_selection"],
                layout="in_turn" if layout == "standard" else layout,
                score_end=end == "end",
                seed=seed,
                form="difference",
                reduction="sum",
                span=None,
            ),
            show_progress=False,
        )
        cond, plain = per_token(result)
        return {
            "difference_sum": auroc(result.scores, positive),
            "difference_mean": auroc(cond - plain, positive),
            "conditioned_mean": auroc(cond, positive),
        }

    run_pools(
        experiment,
        methods or experiment["methods"],
        seeds or experiment["seeds"],
        lambda name, seed: pool(name, settings["n"], seed),
        measure,
    )
    print("\n".join(report_table(experiment)))


def per_token(result):
    """log p(y | D, x) and log p(y | x) per response token; for pairs, chosen-minus-rejected margins of them."""
    if result.pair_logps is None:
        return result.logp_conditioned / result.num_tokens, result.logp_unconditioned / result.num_tokens
    logps, tokens = result.pair_logps, result.pair_tokens
    return tuple(logps[:, a] / tokens[:, 0] - logps[:, a + 1] / tokens[:, 1] for a in (0, 2))


def report_table(experiment: dict) -> list[str]:
    """The AUROC of each score per pool and variant, averaged over the kept seeds."""

    def cells(runs, pool):
        return [f"{np.mean([r[k] for r in runs.values()]):.3f}" for k in SCORES]

    header = ["layout / closing token", "difference, sum (paper)", "difference, per token", "conditioned, per token"]
    return pool_table(experiment, header, cells)


def main(argv=None):
    run_main(argv, __doc__, "benchmarks/experiments/layout/smollm2.json")


if __name__ == "__main__":
    main()
