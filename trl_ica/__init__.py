"""ICA data weighting for TRL: weight every training example by how much it would lower a clean holdout's loss."""

from .scoring.demonstrations import select_demos
from .scoring.engine import LogProbs, score_requests
from .scoring.ica import ICAScores, compute_ica_scores, score_ica
from .scoring.planner import LogProbRequest
from .scoring.rendering import PAPER_TEMPLATE, PLAIN_TEMPLATE, ICAPromptTemplate
from .scoring.weighting import WEIGHTINGS, compute_weights
from .selection.whisperer import WhispererConfig, WhispererResult, whisperer_scores
from .trainer.dpo_config import ICADPOConfig
from .trainer.dpo_trainer import ICADPOTrainer
from .trainer.ica_args import ICAArguments
from .trainer.sft_config import ICASFTConfig
from .trainer.sft_trainer import ICASFTTrainer

__version__ = "0.1.0"

# CPO lives in `trl.experimental`, which warns on import: load it only when asked for
_LAZY = {
    "ICACPOConfig": "trainer.cpo_config",
    "ICASimPOConfig": "trainer.cpo_config",
    "ICACPOTrainer": "trainer.cpo_trainer",
}


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
