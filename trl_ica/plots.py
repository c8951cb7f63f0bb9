"""Pictures of scores and weights (matplotlib, a dependency of trl_ica)."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib cannot be imported, so no ICA plots are written: pip install matplotlib.")
        return None
    return plt


def plot_score_histogram(scores, path: str, labels=None, title: str = "ICA scores") -> str | None:
    """Histogram of `scores`, one colour per distinct value of `labels` when given; returns the PNG path."""
    plt = pyplot()
    if plt is None:
        return None
    scores = np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bins = np.histogram_bin_edges(scores[np.isfinite(scores)], bins=30)
    if labels is None:
        ax.hist(scores, bins=bins, color="tab:blue")
    else:
        labels = np.asarray(labels)
        for value in sorted(set(labels.tolist()), key=str):
            ax.hist(scores[labels == value], bins=bins, alpha=0.6, label=f"{value} (n={int((labels == value).sum())})")
        ax.legend()
    ax.set_xlabel("score")
    ax.set_ylabel("examples")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights_over_training(weights_file: str, path: str) -> str | None:
    """Each trained example's weight against the step, with the per-step mean; returns the PNG path."""
    plt = pyplot()
    if plt is None or not os.path.isfile(weights_file):
        return None
    rows = [json.loads(line) for line in open(weights_file)]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])
    weights = np.array([r["weight"] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.scatter(steps, weights, s=6, alpha=0.35, label="example weight")
    unique = np.unique(steps)
    ax.plot(unique, [weights[steps == s].mean() for s in unique], color="black", label="mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weight")
    ax.set_title("ICA weights over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_training_plots(ica_dir: str) -> list[str]:
    """`scores-<k>.png` for each refresh file and `weights.png` from a run's `ica/` folder."""
    made = []
    for file in sorted(glob.glob(os.path.join(ica_dir, "refresh-*.jsonl"))):
        scores = [json.loads(line)["score"] for line in open(file)]
        name = os.path.basename(file).replace("refresh-", "scores-").replace(".jsonl", ".png")
        made.append(plot_score_histogram(scores, os.path.join(ica_dir, name), title=f"ICA scores ({name[:-4]})"))
    made.append(
        plot_weights_over_training(os.path.join(ica_dir, "weights.jsonl"), os.path.join(ica_dir, "weights.png"))
    )
    return [m for m in made if m]
