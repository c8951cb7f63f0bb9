"""Training-free data selection: the baselines (loss, IFD, RHO, One-Shot, random, ICA) and Data Whisperer."""

from .baselines import METHODS, SELECT_MODES, score_dataset, select_top
from .whisperer import WhispererConfig, WhispererResult, whisperer_scores

__all__ = [
    "METHODS",
    "SELECT_MODES",
    "WhispererConfig",
    "WhispererResult",
    "score_dataset",
    "select_top",
    "whisperer_scores",
]
