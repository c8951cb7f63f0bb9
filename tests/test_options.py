"""The score's options object: checked once, the one source of what a scores file records, what a checkpoint's
fingerprint holds and what the model card lists."""

import dataclasses

import pytest

from trl_ica import ICASFTConfig
from trl_ica.scoring.options import ICAScoringOptions
from trl_ica.trainer.ica_args import ICAArguments, scoring_options
from trl_ica.trainer.state import NOT_FINGERPRINTED, SCORER_FIELD, STATE_FIELDS


def test_every_ica_field_is_a_score_setting_a_state_setting_or_named_as_neither():
    """A new `ica_*` field must be placed: in the score's options (recorded and fingerprinted), in the saved state's
    fingerprint, or in the list of fields that change no saved number (the scoring model is fingerprinted by name)."""
    fields = {f.name for f in dataclasses.fields(ICAArguments)}
    recorded = set(ICAScoringOptions().record())
    placed = recorded | set(STATE_FIELDS) | set(NOT_FINGERPRINTED) | {SCORER_FIELD}
    assert fields == placed, (fields - placed, placed - fields)
    assert not recorded & set(STATE_FIELDS) and not (recorded | set(STATE_FIELDS)) & set(NOT_FINGERPRINTED)


def test_options_from_a_config_record_its_fields():
    args = ICASFTConfig(
        "out",
        use_cpu=True,
        ica_num_demos=2,
        ica_demo_selection="fixed",
        seed=7,
        ica_demo_layout="in_turn",
        ica_demo_template="Q {prompt} A {response}\n",
        ica_query_template="Q {prompt} A",
    )
    options = scoring_options(args)
    record = options.record()
    for name, value in record.items():
        expected = 7 if name == "ica_seed" else getattr(args, name)
        if name == "ica_score_span" and expected == "response":
            expected = None  # the whole response, recorded as it was before it had a name
        assert value == expected, name
    assert options.seeded and "ica_seed" in options.comparable()
    assert "ica_seed" not in dataclasses.replace(options, demo_selection="knn").comparable()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("form", "diff", r"`form` must be one of \['difference', 'conditioned'\], got 'diff'"),
        ("reduction", "median", r"`reduction` must be one of \['sum', 'mean'\]"),
        ("layout", "sideways", r"`layout` must be one of"),
        ("demo_selection", "nearest", r"`demo_selection` must be one of"),
        ("num_demos", 0, r"`num_demos` must be a positive integer, at most the holdout's size, got 0"),
        ("score_end", "yes", r"`score_end` must be True or False, got 'yes'"),
        ("embedding_model", 3, r"`embedding_model` must be None .* got int"),
    ],
)
def test_bad_options_are_refused_once_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        ICAScoringOptions(**{field: value})


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_the_functional_api_and_the_trainers_share_their_defaults_and_the_papers_preset(kind):
    """`ICAScoringOptions()` (what `score_ica`, `compute_ica_scores`, `score_dataset` and `trl-ica score` use unset)
    is the score a trainer config defines at its defaults; `from_preset("paper")` is `ica_preset="paper"`'s."""
    from trl_ica import ICADPOConfig

    config = ICASFTConfig if kind == "sft" else ICADPOConfig
    for preset, options in (("recommended", ICAScoringOptions()), ("paper", ICAScoringOptions.from_preset("paper"))):
        args = config("out", use_cpu=True, bf16=False, ica_preset=preset, seed=0)
        assert scoring_options(args) == options, preset
    assert ICAScoringOptions.from_preset("paper", reduction="mean").reduction == "mean"  # a field given wins


def test_the_scoring_functions_take_the_options_object_and_only_it():
    from trl_ica import compute_ica_scores, score_ica

    with pytest.raises(ValueError, match=r"`options` must be an ICAScoringOptions .* got dict"):
        score_ica(None, None, [], [], {"num_demos": 2})
    with pytest.raises(TypeError, match="num_demos"):
        score_ica(None, None, [], [], num_demos=2)
    with pytest.raises(ValueError, match=r"`compute_ica_scores` got unknown settings \['num_demo'\]"):
        compute_ica_scores(None, None, [], [], num_demo=2)
    with pytest.raises(ValueError, match=r"`num_demos` must be a positive integer"):
        compute_ica_scores(None, None, [], [], num_demos=0)


def test_the_training_options_hold_every_state_field_and_read_the_config_once():
    from trl_ica.trainer.ica_args import training_options

    args = ICASFTConfig("out", use_cpu=True, bf16=False, ica_refresh=2, ica_holdout_cutoff=0.25, disable_tqdm=True)
    training = training_options(args)
    assert training.record() == {name: getattr(args, name) for name in STATE_FIELDS}
    assert (training.refresh, training.holdout_cutoff, training.show_progress, training.online) == (
        2,
        0.25,
        False,
        False,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        training.refresh = 3
