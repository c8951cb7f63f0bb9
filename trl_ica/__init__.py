"""ICA data weighting for TRL: weight every training example by how much it would lower a clean holdout's loss."""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Every name loads its module when first asked for: `trl_ica.scoring` then imports with torch, transformers and
# accelerate alone (a GPU machine without trl or datasets can run the scoring engine), and CPO's module, from
# `trl.experimental` (which warns on import), loads only when used.
_LAZY = {
    "select_demos": "scoring.demonstrations",
    "LogProbs": "scoring.engine",
    "score_requests": "scoring.engine",
    "ICAScores": "scoring.ica",
    "compute_ica_scores": "scoring.ica",
    "score_ica": "scoring.ica",
    "LogProbRequest": "scoring.planner",
    "PAPER_TEMPLATE": "scoring.rendering",
    "PLAIN_TEMPLATE": "scoring.rendering",
    "ICAPromptTemplate": "scoring.rendering",
    "WEIGHTINGS": "scoring.weighting",
    "compute_weights": "scoring.weighting",
    "WhispererConfig": "selection.whisperer",
    "WhispererResult": "selection.whisperer",
    "whisperer_scores": "selection.whisperer",
    "ICADPOConfig": "trainer.dpo_config",
    "ICADPOTrainer": "trainer.dpo_trainer",
    "ICAArguments": "trainer.ica_args",
    "ICASFTConfig": "trainer.sft_config",
    "ICASFTTrainer": "trainer.sft_trainer",
    "ICACPOConfig": "trainer.cpo_config",
    "ICASimPOConfig": "trainer.cpo_config",
    "ICACPOTrainer": "trainer.cpo_trainer",
}

if TYPE_CHECKING:  # the names as type checkers and editors see them
    from .scoring.demonstrations import select_demos
    from .scoring.engine import LogProbs, score_requests
    from .scoring.ica import ICAScores, compute_ica_scores, score_ica
    from .scoring.planner import LogProbRequest
    from .scoring.rendering import PAPER_TEMPLATE, PLAIN_TEMPLATE, ICAPromptTemplate
    from .scoring.weighting import WEIGHTINGS, compute_weights
    from .selection.whisperer import WhispererConfig, WhispererResult, whisperer_scores
    from .trainer.cpo_config import ICACPOConfig, ICASimPOConfig
    from .trainer.cpo_trainer import ICACPOTrainer
    from .trainer.dpo_config import ICADPOConfig
    from .trainer.dpo_trainer import ICADPOTrainer
    from .trainer.ica_args import ICAArguments
    from .trainer.sft_config import ICASFTConfig
    from .trainer.sft_trainer import ICASFTTrainer


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})


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
