"""The recommended ICA settings and the paper's, defined once.

The trainer configs, `trl-ica score` and the demo read their ICA defaults from here, the recipes name the preset,
and docs/configuration.md is generated from the configs built with it. A preset fills the `ica_*` fields the user
left unset; a field that is set always wins.

- `"recommended"` (the default): what the benchmarks in docs/benchmarks.md measured best.
  - SFT: log p(y | D, x) per token (the conditioned form) with the demonstrations as earlier chat turns, and each
    example weighted by where its score falls among the holdout's own scores (`holdout_quantile`), which weights each
    example on its own (batch min-max gives one example of every step weight 0, even on clean data).
  - Preference pairs (DPO, CPO, SimPO): the same score of the chosen-minus-rejected margin with batch min-max weights.
  The measurements behind both, with uniform and clean-only training beside them, are in docs/benchmarks.md.
- `"paper"`: arXiv 2510.14459 as specified: the summed difference log p(y | D, x) - log p(y | x), demonstrations in
  the user turn with the paper's wording, only the response's own tokens scored, batch min-max weights.

Both presets choose k = 3 nearest holdout demonstrations (`ica_num_demos`, `ica_demo_selection="knn"`) scored once
before training (`ica_refresh=1`); those fields have plain defaults.
"""

from __future__ import annotations

PRESETS = ("recommended", "paper")
#: The kinds of training a preset distinguishes: SFT rows, and preference pairs (DPO, CPO, SimPO).
KINDS = ("sft", "preference")

#: The fields that define a score, per preset (the same for rows and pairs).
_SCORING = {
    "recommended": {
        "ica_score_form": "conditioned",
        "ica_reduction": "mean",
        "ica_demo_layout": "turns",
        "ica_score_end_token": True,
    },
    "paper": {
        "ica_score_form": "difference",
        "ica_reduction": "sum",
        "ica_demo_layout": "in_turn",
        "ica_score_end_token": False,
    },
}
_WEIGHTING = {
    "recommended": {"sft": "holdout_quantile", "preference": "batch_minmax"},
    "paper": {"sft": "batch_minmax", "preference": "batch_minmax"},
}

#: Every field a preset sets; in the configs these default to None ("from the preset").
PRESET_FIELDS = (*_SCORING["recommended"], "ica_weighting")


def _check(preset: str, kind: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"`ica_preset` must be one of {list(PRESETS)}, got {preset!r}.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}.")


def scoring_settings(preset: str = "recommended") -> dict:
    """The preset's score settings (`ica_score_form`, `ica_reduction`, `ica_demo_layout`, `ica_score_end_token`)."""
    _check(preset, "sft")
    return dict(_SCORING[preset])


def preset_settings(preset: str = "recommended", kind: str = "sft") -> dict:
    """Every field `preset` sets for `kind` (`"sft"` or `"preference"`), as `ica_*` config fields."""
    _check(preset, kind)
    return {**_SCORING[preset], "ica_weighting": _WEIGHTING[preset][kind]}


def apply_preset(config, kind: str) -> None:
    """Fill the `ica_*` fields of `config` left at None from its `ica_preset`; fields the user set are kept."""
    for name, value in preset_settings(config.ica_preset, kind).items():
        if getattr(config, name) is None:
            setattr(config, name, value)
