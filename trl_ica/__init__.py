"""ICA data weighting for TRL: weight every training example by how much it would lower a clean holdout's loss."""

from .demos import select_demos
from .dpo_config import ICADPOConfig
from .dpo_trainer import ICADPOTrainer
from .engine import LogProbRequest, LogProbs, score_requests
from .ica_args import ICAArguments
from .rendering import PAPER_TEMPLATE, PLAIN_TEMPLATE, ICAPromptTemplate
from .scoring import ICAScores, compute_ica_scores, score_ica
from .sft_config import ICASFTConfig
from .sft_trainer import ICASFTTrainer
from .weighting import WEIGHTINGS, compute_weights
from .whisperer import WhispererConfig, WhispererResult, whisperer_scores

__version__ = "0.1.0"

# CPO lives in `trl.experimental`, which warns on import: load it only when asked for
_LAZY = {"ICACPOConfig": "cpo_config", "ICASimPOConfig": "cpo_config", "ICACPOTrainer": "cpo_trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ICAArguments",
    "ICACPOConfig",
    "ICACPOTrainer",
    "ICADPOConfig",
    "ICADPOTrainer",
    "ICAPromptTemplate",
    "ICASFTConfig",
    "ICASFTTrainer",
    "ICAScores",
    "ICASimPOConfig",
    "LogProbRequest",
    "LogProbs",
    "PAPER_TEMPLATE",
    "PLAIN_TEMPLATE",
    "WEIGHTINGS",
    "WhispererConfig",
    "WhispererResult",
    "compute_ica_scores",
    "compute_weights",
    "score_ica",
    "score_requests",
    "select_demos",
    "whisperer_scores",
]
