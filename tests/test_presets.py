"""The ICA defaults: one preset table, the configs built from it, and the documentation checked against both."""

import ast
import dataclasses
import os
import re

import pytest
from trl import DPOConfig, SFTConfig

from trl_ica import ICADPOConfig, ICASFTConfig
from trl_ica.cli.main import fill_from_preset
from trl_ica.presets import PRESET_FIELDS, PRESETS, preset_settings
from trl_ica.trainer.config_docs import config_reference, field_docs, resolved_defaults
from trl_ica.trainer.ica_args import ICAArguments
from trl_ica.trainer.mixin import ica_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND = {"ICASFTConfig": "sft", "ICADPOConfig": "preference"}


def test_configuration_reference_is_current():
    """docs/configuration.md is what the configs generate; regenerate it with the command in its header."""
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        assert f.read() == config_reference(), "run `python -m trl_ica.trainer.config_docs docs/configuration.md`"


def test_every_field_is_documented_with_its_real_default():
    """Each `ica_*` field has a docstring entry; a literal default in the docstring is the dataclass's, and a preset
    field's entry names what each preset gives it (read off configs built with only `ica_preset`)."""
    docs = field_docs()
    fields = {f.name: f for f in dataclasses.fields(ICAArguments)}
    assert set(docs) == set(fields)
    resolved = {preset: resolved_defaults(preset) for preset in PRESETS}
    for name, (kind, text) in docs.items():
        literal = re.search(r"defaults to `(.+?)`", kind)
        if name in PRESET_FIELDS:
            assert fields[name].default is None and "defaults to the preset's" in kind, name
            recommended, paper = re.match(r"recommended: (.*?); paper: (.*?)[.(]", text).groups()
            for preset, said in (("recommended", recommended), ("paper", paper)):
                for cls, values in resolved[preset].items():
                    shown = f"`{values[name]!r}`".replace("'", '"')
                    assert shown in said, (name, preset, cls, shown, said)
        elif literal:
            for values in resolved["recommended"].values():  # the value after the config's own normalisation
                assert ast.literal_eval(literal[1]) == values[name], name
        else:
            assert fields[name].default is None and "*optional*" in kind, name


@pytest.mark.parametrize("config_class", [ICASFTConfig, ICADPOConfig])
def test_presets_fill_unset_fields_and_explicit_fields_win(config_class):
    kind = KIND[config_class.__name__]
    for preset in PRESETS:
        config = config_class("out", use_cpu=True, ica_preset=preset)
        assert {name: getattr(config, name) for name in PRESET_FIELDS} == preset_settings(preset, kind)
    paper = preset_settings("paper", kind)
    config = config_class("out", use_cpu=True, ica_preset="paper", ica_reduction="mean", ica_score_end_token=True)
    assert (config.ica_reduction, config.ica_score_end_token, config.ica_score_form) == (
        "mean",
        True,
        paper["ica_score_form"],
    )
    # the SFT default draws rows by weights of the whole training set; its loss weights weigh each example on its
    # own (min-max would zero one example of every clean batch)
    default = ICASFTConfig("out", use_cpu=True)
    assert (default.ica_weight_mode, default.ica_weighting) == ("sampling", "holdout_posterior")
    assert ICASFTConfig("out", use_cpu=True, ica_weight_mode="loss").ica_weighting == "holdout_quantile"
    with pytest.raises(ValueError, match=r"`ica_preset` must be one of \['recommended', 'paper'\], got 'papers'"):
        config_class("out", use_cpu=True, ica_preset="papers")


def test_paper_preset_is_the_specification():
    """method.md: the summed difference, the demonstrations in the user turn, only y's tokens, batch min-max."""
    for kind in ("sft", "preference"):
        assert preset_settings("paper", kind) == {
            "ica_score_form": "difference",
            "ica_reduction": "sum",
            "ica_demo_layout": "in_turn",
            "ica_score_end_token": False,
            "ica_score_span": "response",
            "ica_weight_mode": "loss",
            "ica_weighting": "batch_minmax",
        }


@pytest.mark.parametrize(
    "setting, reason",
    [
        (dict(packing=True), "packing=True"),
        (dict(ica_refresh="online"), "ica_refresh='online'"),
        (dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy"),
        (dict(ica_loss_reduction="weighted_mean"), "ica_loss_reduction='weighted_mean'"),
        (dict(ica_weighting="batch_minmax"), "ica_weighting='batch_minmax'"),
    ],
)
def test_the_recommended_sft_preset_weights_the_loss_where_it_cannot_sample(setting, reason):
    """Left unset, `ica_weight_mode` is the preset's sampling unless a setting the user chose rules it out: then loss
    weights (the preset's `holdout_quantile` unless a weighting was set), with the reason kept for the trainer's
    log. The same setting with sampling asked for explicitly is refused with that reason."""
    config = ICASFTConfig("out", use_cpu=True, **setting)
    assert config.ica_weight_mode == "loss"
    assert config.ica_weighting == setting.get("ica_weighting", "holdout_quantile")
    assert "draws rows by their weights" in config.ica_weight_mode_reason and reason in config.ica_weight_mode_reason
    with pytest.raises(ValueError, match=re.escape(reason)):
        ICASFTConfig("out", use_cpu=True, ica_weight_mode="sampling", **setting)
    assert ICASFTConfig("out", use_cpu=True).ica_weight_mode_reason is None


def test_score_command_takes_unset_flags_from_the_preset():
    from argparse import Namespace

    flags = dict(form=None, demo_layout=None, score_end_token=None, score_span=None)
    args = Namespace(preset="paper", reduction="mean", **flags)
    fill_from_preset(args)
    assert (args.form, args.reduction, args.demo_layout, args.score_end_token, args.score_span) == (
        "difference",
        "mean",
        "in_turn",
        "false",
        "response",
    )
    args = Namespace(preset="recommended", reduction=None, **{**flags, "score_span": "last_line"})
    fill_from_preset(args)
    assert (args.form, args.reduction, args.demo_layout, args.score_end_token, args.score_span) == (
        "conditioned",
        "mean",
        "turns",
        "true",
        "last_line",
    )
    args = Namespace(preset="recommended", reduction=None, **flags)
    fill_from_preset(args)
    assert args.score_span == "response"


def test_stock_config_is_taken_with_the_ica_defaults():
    stock = SFTConfig(
        "out", use_cpu=True, bf16=False, learning_rate=3e-4, max_length=77, gradient_accumulation_steps=2
    )
    config = ica_args(stock, None, ICASFTConfig, "ICA-SFT")
    assert type(config) is ICASFTConfig
    assert (config.learning_rate, config.max_length, config.gradient_accumulation_steps) == (3e-4, 77, 2)
    assert (config.ica_weight_mode, config.ica_weighting, config.ica_preset) == (
        "sampling",
        "holdout_posterior",
        "recommended",
    )
    with pytest.raises(TypeError, match="`args` must be an ICASFTConfig, or a config it extends, got DPOConfig"):
        ica_args(DPOConfig("out", use_cpu=True, bf16=False), None, ICASFTConfig, "ICA-SFT")
    with pytest.raises(TypeError, match="got ICADPOConfig"):
        ica_args(ICADPOConfig("out", use_cpu=True), None, ICASFTConfig, "ICA-SFT")
