"""A classifier's recipe from options as `vitkit train` gives them: recipe_from_flags (flag, else the saved run's
recipe, else None for the planner), the same from Python as from the command line."""
import json

import pytest

from vitkit.errors import ConfigError
from vitkit.tasks.recipe import Recipe, recipe_from_flags


@pytest.fixture
def saved(tmp_path):
    """A run folder whose config.json records a resolved recipe."""
    values = {"lr": 0.01, "embed_dim": 64, "depth": 4, "time_budget": 60.0, "precision": "bf16", "mixup": None}
    (tmp_path / "config.json").write_text(json.dumps({"recipe": {"values": values}}))
    return tmp_path


def test_nothing_given_leaves_every_field_to_the_planner():
    assert recipe_from_flags({}) == Recipe()
    assert recipe_from_flags({f: None for f in Recipe.__dataclass_fields__}) == Recipe()
    assert recipe_from_flags({"precision": "auto"}).precision is None


def test_a_flag_beats_the_saved_recipe(saved):
    r = recipe_from_flags({"lr": 0.5, "depth": None}, saved)
    assert (r.lr, r.depth, r.embed_dim, r.time_budget, r.precision, r.mixup) == (0.5, 4, 64, 60.0, "bf16", None)
    assert recipe_from_flags({"precision": "auto"}, saved / "config.json").precision == "bf16"
    assert recipe_from_flags({"precision": "fp32"}, saved).precision == "fp32"


def test_epochs_or_a_none_budget_replace_the_saved_budget(saved):
    assert recipe_from_flags({"epochs": 3}, saved).time_budget is None
    assert recipe_from_flags({"epochs": 3}, saved).epochs == 3
    assert recipe_from_flags({"time_budget": "none"}, saved).time_budget is None
    assert recipe_from_flags({"time_budget": "2m"}, saved).time_budget == 120.0
    assert recipe_from_flags({"epochs": 3, "time_budget": "2m"}, saved).time_budget == 120.0


def test_an_architecture_model_arg_is_a_flag_unless_the_flag_is_given(saved):
    r = recipe_from_flags({}, saved, {"depth": 2, "embed_dim": 32, "drop_path_rate": 0.3})
    assert (r.depth, r.embed_dim, r.drop_path_rate) == (2, 32, None)  # drop_path_rate: the model's, not the recipe's
    assert recipe_from_flags({"depth": 6}, None, {"depth": 2}).depth == 6


def test_stem_channels_from_the_command_line_json_and_model_arg(tmp_path):
    import argparse

    from vitkit.cli import build_parser

    p = build_parser()
    assert p.parse_args(["train", "--stem-channels", "32,64,128"]).stem_channels == (32, 64, 128)
    assert p.parse_args(["train", "--stem-channels", ""]).stem_channels == ()
    assert p.parse_args(["train"]).stem_channels is None  # planned
    for bad in ("a,b", "32,-1", "0"):
        with pytest.raises(SystemExit):
            p.parse_args(["train", "--stem-channels", bad])
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated positive widths"):
        from vitkit.cli import _widths
        _widths("32,x")
    # a saved run's config.json holds a JSON list: the recipe reads it back as the tuple it was
    (tmp_path / "config.json").write_text(json.dumps({"recipe": {"values": {"stem_channels": [32, 64, 128]}}}))
    assert recipe_from_flags({}, tmp_path).stem_channels == (32, 64, 128)
    assert recipe_from_flags({}, None, {"stem_channels": [8, 16]}).stem_channels == (8, 16)
    with pytest.raises(ConfigError, match="stem_channels"):
        Recipe(stem_channels=(32, 0))


def test_bad_values_and_unknown_fields_are_one_line_errors(saved):
    with pytest.raises(ConfigError, match="lr"):
        recipe_from_flags({"lr": -1.0})
    with pytest.raises(ConfigError, match="unknown recipe field"):
        recipe_from_flags({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="--recipe"):
        recipe_from_flags({}, saved / "missing")


def test_tta_zoom_from_the_command_line_and_json(tmp_path):
    import argparse

    from vitkit.cli import _zooms, build_parser

    p = build_parser()
    assert p.parse_args(["train", "--tta-zoom", "1.1,1.2"]).tta_zoom == (1.1, 1.2)
    assert p.parse_args(["train", "--tta-zoom", ""]).tta_zoom == ()
    assert p.parse_args(["train"]).tta_zoom is None  # planned
    for bad in ("x", "0.9", "1.0", "2.5"):
        with pytest.raises(SystemExit):
            p.parse_args(["train", "--tta-zoom", bad])
    with pytest.raises(argparse.ArgumentTypeError, match="zoom factors above 1 and at most 2"):
        _zooms("1.1,0.5")
    (tmp_path / "config.json").write_text(json.dumps({"recipe": {"values": {"tta_zoom": [1.1, 1.2]}}}))
    assert recipe_from_flags({}, tmp_path).tta_zoom == (1.1, 1.2)  # a saved run's JSON list reads back as the tuple
    with pytest.raises(ConfigError, match="tta_zoom must be a list of zoom factors above 1"):
        Recipe(tta_zoom=[0.5])
