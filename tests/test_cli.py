"""The CLI's two promises beyond its flags: one-line errors for vitkit's own errors (and OSError) only, with a
traceback under --debug and for every other exception (a bug is not a user error); and one set of engine flags,
generated from TrainConfig, that train, pretrain and train-gen all take and all pass to the engine."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitkit
from vitkit.cli import _ENGINE_FLAGS, build_parser, main
from vitkit.errors import ConfigError
from vitkit.train import TrainConfig

TRAINING = ("train", "pretrain", "train-gen")


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _boom(*args, **kwargs):
    raise ValueError("an internal bug")


def test_a_user_error_is_one_line_and_debug_shows_its_traceback(capsys):
    assert main(["models", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit: error: no model matches") and err.count("\n") == 1
    with pytest.raises(ConfigError):  # --debug: the exception propagates, and Python prints its traceback
        main(["--debug", "models", "no_such_model"])


def test_an_internal_valueerror_is_not_reported_as_a_user_error(monkeypatch, capsys):
    import vitkit.tasks.explain

    monkeypatch.setattr(vitkit.tasks.explain, "explain_images", _boom)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["explain", "model.safetensors", "image.png"])
    assert "vitkit: error" not in capsys.readouterr().err


def test_an_internal_bug_prints_a_traceback_from_the_command_line(tmp_path):
    code = ("import vitkit.tasks.explain as e\n"
            "def boom(*a, **k): raise ValueError('an internal bug')\n"
            "e.explain_images = boom\n"
            "from vitkit.cli import main\n"
            "raise SystemExit(main(['explain', 'model.safetensors', 'image.png']))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(vitkit.__file__).parents[1])}  # this vitkit, from any folder
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: an internal bug" in r.stderr, r.stderr
    assert "vitkit: error" not in r.stderr


@pytest.mark.parametrize("command", TRAINING)
def test_every_training_command_takes_every_engine_flag_with_one_default(command):
    sub = _sub(command)
    dests = {a.dest: a for a in sub._actions}
    fields = {f.name for f in TrainConfig.__dataclass_fields__.values()}
    assert set(_ENGINE_FLAGS) <= fields
    for field in _ENGINE_FLAGS:
        assert field in dests, (command, field)
        assert dests[field].default in (None, False), (command, field)  # unset: TrainConfig's default applies
    for flag in ("--accum-steps", "--layer-decay", "--workers", "--runs-dir", "--ema", "--compile", "--no-compile"):
        assert flag in sub._option_string_actions, (command, flag)


@pytest.mark.slow
def test_pretrain_takes_the_flags_that_were_train_only(tmp_path):
    """--accum-steps, --layer-decay and --workers reach pretrain's engine (they were declared for train only)."""
    rc = main(["pretrain", "--data", "mnist5k", "--runs-dir", str(tmp_path), "--name", "mae", "--model-arg",
               "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--decoder-depth", "1",
               "--decoder-dim", "16", "--decoder-heads", "2", "--max-train", "100", "--max-val", "50", "--epochs",
               "1", "--max-steps", "2", "--batch-size", "25", "--accum-steps", "2", "--layer-decay", "0.75",
               "--workers", "0", "--precision", "auto", "--quiet"])
    assert rc == 0
    train = json.loads((tmp_path / "mae" / "config.json").read_text())["train"]
    assert train["accum_steps"] == 2 and train["layer_decay"] == 0.75 and train["workers"] == 0
    assert train["precision"] == "fp32"  # 'auto' for the engine: the recipe's choice, then TrainConfig's
