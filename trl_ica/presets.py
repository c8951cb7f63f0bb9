"""The recommended ICA settings and the paper's, defined once.

The trainer configs, `trl-ica score` and the demo read their ICA defaults from here, the recipes name the preset,
and docs/configuration.md is generated from the configs built with it. A preset fills the `ica_*` fields the user
left unset; a field that is set always wins.

- `"recommended"` (the default): what the benchmarks in docs/benchmarks.md measured best.
  - SFT: log p(y | D, x) per token (the conditioned form) of each whole response with the demonstrations as earlier
    chat turns, and the rows drawn by their weights (`ica_weight_mode="sampling"`), each weight the posterior that a
    row is holdout-like (`holdout_posterior`): every batch full, the loss the stock one. Where the trainer cannot draw
    single rows by weight (packing, a streamed training set, online scoring, another `train_sampling_strategy`, a
    batch weighting or `weighted_mean` set by the user), the loss is weighted instead, by where a score falls among
    the holdout's own (`holdout_quantile`); the trainer logs which it chose and why.
  - Preference pairs (DPO, CPO, SimPO): the same score of the chosen-minus-rejected margin (whole responses) with
    batch min-max weights.
  The measurements behind both, with uniform and clean-only training beside them, are in docs/benchmarks.md.
- `"paper"`: arXiv 2510.14459 as specified: the summed difference log p(y | D, x) - log p(y | x), demonstrations in
  the user turn with the paper's wording, only the response's own tokens scored, whole responses, batch min-max
  weights.

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
        "ica_score_span": "response",
    },
    "paper": {
        "ica_score_form": "difference",
        "ica_reduction": "sum",
        "ica_demo_layout": "in_turn",
        "ica_score_end_token": False,
        "ica_score_span": "response",
    },
}
#: Where the weights act (`ica_weight_mode`), per preset and kind.
_WEIGHT_MODE = {
    "recommended": {"sft": "sampling", "preference": "loss"},
    "paper": {"sft": "loss", "preference": "loss"},
}
#: The weighting of loss weights, per preset and kind.
_WEIGHTING = {
    "recommended": {"sft": "holdout_quantile", "preference": "batch_minmax"},
    "paper": {"sft": "batch_minmax", "preference": "batch_minmax"},
}
#: The weighting of sampling weights, whatever the preset: sampling draws rows by weights of the whole training set,
#: and `holdout_posterior` keeps a holdout-like row at full weight where `holdout_quantile` would spread clean rows
#: over [0, 1].
SAMPLING_WEIGHTING = "holdout_posterior"

#: Every field a preset sets; in the configs these default to None ("from the preset").
PRESET_FIELDS = (*_SCORING["recommended"], "ica_weight_mode", "ica_weighting")


def _check(preset: str, kind: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"`ica_preset` must be one of {list(PRESETS)}, got {preset!r}.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}.")


def scoring_settings(preset: str = "recommended") -> dict:
    """The preset's score settings (`ica_score_form`, `ica_reduction`, `ica_demo_layout`, `ica_score_end_token`,
    `ica_score_span`)."""
    _check(preset, "sft")
    return dict(_SCORING[preset])


def preset_weight_mode(preset: str = "recommended", kind: str = "sft") -> str:
    """Where `preset`'s weights act for `kind`: `"loss"` or `"sampling"`."""
    _check(preset, kind)
    return _WEIGHT_MODE[preset][kind]


def preset_settings(preset: str = "recommended", kind: str = "sft", weight_mode: str | None = None) -> dict:
    """Every field `preset` sets for `kind` (`"sft"` or `"preference"`), as `ica_*` config fields; with `weight_mode`
    given, the weighting the preset gives that mode (sampling always draws by `SAMPLING_WEIGHTING`)."""
    mode = weight_mode or preset_weight_mode(preset, kind)
    weighting = SAMPLING_WEIGHTING if mode == "sampling" else _WEIGHTING[preset][kind]
    return {**_SCORING[preset], "ica_weight_mode": mode, "ica_weighting": weighting}


def apply_preset(config, kind: str) -> None:
    """Fill the `ica_*` fields of `config` left at None from its `ica_preset` (the weighting for the weight mode the
    config has by then); fields the user set are kept."""
    for name, value in preset_settings(config.ica_preset, kind, config.ica_weight_mode).items():
        if getattr(config, name) is None:
            setattr(config, name, value)
