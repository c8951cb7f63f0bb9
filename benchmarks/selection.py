"""How well each training-free score finds the data that matters, on SmolLM2-135M-Instruct (CPU).

Two pools, one AUROC per method (larger score = selected):
- noisy GSM8K: clean rows against corrupted ones (wrong final number, another problem's solution, truncated),
  with a clean GSM8K holdout;
- a reasoning-gym mixture (leg counting, arithmetic, chain sums, letter counting, bit counting): rows of the
  target task (leg counting) against the others, with a target-task holdout.

RHO-Loss's reference model is SmolLM2 fine-tuned with LoRA on the holdout (SFTTrainer, merged).

    python -m benchmarks.run benchmarks/experiments/selection/smollm2.json [--methods ...] [--seeds 0]

The settings are the GSM8K pool size `n` (the mixture has 16 rows per task), Data Whisperer's `max_new_tokens` and
RHO-Loss's `rho_epochs`. Every finished (pool, method, seed) is kept in the results file with its AUROC and wall
time (the times of methods that share the two cores with nothing else only); a file made with other settings is
refused.
"""

import tempfile
import warnings

import numpy as np
from trl import SFTConfig, SFTTrainer

from benchmarks.common.data import reasoning_gym_mixture
from benchmarks.common.models import load_model
from benchmarks.common.models import lora as recipe_lora
from benchmarks.common.pools import pool_table, run_pools
from benchmarks.run import main as run_main
from trl_ica import score_ica
from trl_ica.cli.scenarios import auroc, noisy_gsm8k
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.selection.baselines import score_dataset
from trl_ica.selection.whisperer import WhispererConfig, whisperer_scores

warnings.filterwarnings("ignore")


def reference_model(holdout, epochs):
    """SmolLM2 with a LoRA adapter trained on the holdout, merged: RHO-Loss's reference."""
    model, _ = load_model()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=4,
            num_train_epochs=epochs,
            learning_rate=2e-4,
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=100,
        )
        lora = recipe_lora()
        trainer = SFTTrainer(model=model, args=args, train_dataset=holdout, peft_config=lora)
        trainer.train()
        return trainer.model.merge_and_unload().eval()


SCENARIOS = ("gsm8k", "mixture")
METHODS = (
    "ica",
    "ica_per_token",
    "whisperer_exact_pool",
    "whisperer_ll_pool",
    "whisperer_ll_holdout",
    "oneshot",
    "rho",
    "loss",
    "ifd",
    "random",
)
SETTING_KEYS = ("n", "max_new_tokens", "rho_epochs")


def scenario(name, n, seed):
    """(pool, holdout, positive): noisy GSM8K (clean rows positive) or the task mixture (leg counting positive)."""
    if name == "gsm8k":
        train, holdout, _ = noisy_gsm8k(n_train=n, n_holdout=16, n_test=0, noise=0.4, seed=seed)
        return train.remove_columns("corruption"), holdout, np.array(train["corruption"]) == "clean"
    train, holdout, _ = reasoning_gym_mixture(seed=seed)
    return train.remove_columns("task"), holdout, np.array(train["task"]) == "leg_counting"


def scorers(model, tokenizer, train, holdout, settings, seed):
    """`{method: () -> scores}`; ICA's two forms share one scoring, RHO-Loss's reference is trained on first use."""
    small = dict(num_demos=5, num_queries=3, batch_size=8, max_new_tokens=settings["max_new_tokens"], seed=seed)
    cache = {}

    def ica():
        if "ica" not in cache:
            cache["ica"] = score_ica(
                model,
                tokenizer,
                train,
                holdout,
                ICAScoringOptions(
                    num_demos=3, demo_selection="knn", layout="in_turn", form="difference", reduction="sum", span=None
                ),
                show_progress=False,
            )
        return cache["ica"]

    def whisperer(metric, queries):
        config = WhispererConfig(metric=metric, **small)
        return lambda: whisperer_scores(model, tokenizer, train, queries, config, show_progress=False)

    return {
        "ica": lambda: ica().scores,
        "ica_per_token": lambda: (ica().logp_conditioned - ica().logp_unconditioned) / ica().num_tokens,
        "whisperer_exact_pool": whisperer("exact_match", None),
        "whisperer_ll_pool": whisperer("log_likelihood", None),
        "whisperer_ll_holdout": whisperer("log_likelihood", holdout),
        "oneshot": lambda: score_dataset("oneshot", model, tokenizer, train, holdout),
        "rho": lambda: score_dataset(
            "rho", model, tokenizer, train, reference_model=reference_model(holdout, settings["rho_epochs"])
        ),
        "loss": lambda: score_dataset("loss", model, tokenizer, train),
        "ifd": lambda: score_dataset("ifd", model, tokenizer, train),
        "random": lambda: score_dataset("random", None, None, train, options=ICAScoringOptions(seed=seed)),
    }


def run_experiment(experiment: dict, methods=None, seeds=None, keep_logs="") -> None:
    """An experiment file's scorings (its `methods` and `seeds` unless given), each kept as it finishes; then its
    table."""
    settings = experiment["settings"]
    if set(settings) != set(SETTING_KEYS):
        raise SystemExit(f"selection settings are {list(SETTING_KEYS)}, got {sorted(settings)}.")
    model, tokenizer = load_model()

    def make_pool(name, seed):
        train, holdout, positive = scenario(name, settings["n"], seed)
        return scorers(model, tokenizer, train, holdout, settings, seed), positive

    def measure(data, method, seed):
        score, positive = data
        out, record = score[method](), {}
        if hasattr(out, "summary"):  # Data Whisperer: how many rows its prompts could tell apart
            record = {k: out.summary()[k] for k in ("distinct_scores", "tied_rows")}
            out = out.scores
        return {"auroc": auroc(out, positive), **record}

    run_pools(experiment, methods or experiment["methods"], seeds or experiment["seeds"], make_pool, measure)
    print("\n".join(report_table(experiment)))


def report_table(experiment: dict) -> list[str]:
    """Per pool, each method's AUROC averaged over the kept seeds."""

    def cells(runs, pool):
        tied = all(r.get("distinct_scores") == 1 for r in runs.values())
        return [f"{np.mean([r['auroc'] for r in runs.values()]):.3f}" + (" (every row tied)" if tied else "")]

    return pool_table(experiment, ["method", "AUROC"], cells)


def main(argv=None):
    run_main(argv, __doc__, "benchmarks/experiments/selection/smollm2.json")


if __name__ == "__main__":
    main()
