"""A TrainConfig from options as a command line gives them (None = not given): train_config_from_flags and
parse_budget, which every training command uses and a Python caller can too."""
import pytest

from vitkit.errors import ConfigError
from vitkit.train import TrainConfig, parse_budget, train_config_from_flags


def test_parse_budget_reads_durations_and_none():
    assert parse_budget("10m") == 600.0 and parse_budget("1h30m") == 5400.0 and parse_budget(90) == 90.0
    for off in (None, "none", "NONE", "off", "0"):
        assert parse_budget(off) is None
    with pytest.raises(ConfigError, match="duration"):
        parse_budget("ten minutes")


def test_a_flag_beats_the_recipe_which_beats_the_default():
    recipe = {"lr": 0.01, "batch_size": 32, "time_budget": 60.0}
    tc = train_config_from_flags({"lr": 0.5, "epochs": None, "precision": "auto"}, recipe, "digits")
    assert (tc.lr, tc.batch_size, tc.time_budget, tc.name) == (0.5, 32, 60.0, "digits")
    assert tc.precision == TrainConfig().precision and tc.weight_decay == TrainConfig().weight_decay
    assert train_config_from_flags({"seed": 0, "name": "mine"}, {"seed": 3}).seed == 0  # a 0 given is a value
    assert train_config_from_flags({"name": "mine"}, recipe).name == "mine"
    assert train_config_from_flags({}).name == "run"


def test_epochs_or_a_budget_given_replace_the_recipes_budget():
    recipe = {"time_budget": 60.0, "epochs": 3}
    assert train_config_from_flags({"epochs": 5}, recipe).time_budget is None
    assert train_config_from_flags({"epochs": 5}, recipe).epochs == 5
    assert train_config_from_flags({"time_budget": "2m"}, recipe).time_budget == 120.0
    assert train_config_from_flags({"time_budget": "none"}, recipe).time_budget is None


def test_a_resumed_run_ignores_the_recipe_and_skip_leaves_fields_to_the_task():
    recipe = {"lr": 0.01, "time_budget": 60.0}
    tc = train_config_from_flags({"resume": "runs/x", "epochs": 4}, recipe)
    assert (tc.resume, tc.epochs, tc.lr, tc.time_budget) == ("runs/x", 4, TrainConfig().lr, None)
    tc = train_config_from_flags({"lr": 0.5, "seed": 7}, recipe, skip=("lr", "seed"))
    assert (tc.lr, tc.seed) == (TrainConfig().lr, TrainConfig().seed)


def test_resume_with_time_budget_none_needs_an_epoch_count():
    """'none' parses to None, which a resume reads as "not given": alone it would be ignored, so it is refused
    with a one-line reason; with --epochs the epoch count replaces the run's budget (resume_configs)."""
    with pytest.raises(ConfigError, match=r"--time-budget none with --resume.*add --epochs N"):
        train_config_from_flags({"resume": "runs/x", "time_budget": "none"}, {})
    tc = train_config_from_flags({"resume": "runs/x", "time_budget": "off", "epochs": 6}, {})
    assert (tc.epochs, tc.time_budget) == (6, None)
    assert train_config_from_flags({"resume": "runs/x", "time_budget": "5m"}, {}).time_budget == 300.0


def test_strategy_is_ddp_or_fsdp_and_fsdp_takes_no_fp16():
    assert TrainConfig().strategy == "ddp" and train_config_from_flags({"strategy": "fsdp"}).strategy == "fsdp"
    with pytest.raises(ConfigError, match="strategy") as e:
        TrainConfig(strategy="zero3")
    assert e.value.field == "strategy"
    with pytest.raises(ConfigError, match="use --precision bf16"):
        TrainConfig(strategy="fsdp", precision="fp16")
    TrainConfig(strategy="fsdp", precision="bf16")
