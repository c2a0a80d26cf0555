"""Reading a run back: every reader opens it through `RunDir.open` / `read_config`, so a missing folder, a missing
config.json and a damaged one are each one line that names the run and what is wrong, whoever reads it."""
import json

import pytest
import torch
from torch import nn

from vitkit.cli import main
from vitkit.errors import ConfigError
from vitkit.tasks.classify import ClassifierConfig, train_classifier
from vitkit.train import RunDir, Trainer, TrainConfig, read_config

DAMAGED = {"not JSON": b'{"train": {"epochs": 2', "not text": b"\x80\x81\xfe\xff" * 8, "a list": b"[1, 2]"}


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _run(tmp_path, config: bytes = None, state: bool = True):
    run = tmp_path / "r"
    run.mkdir()
    if config is not None:
        (run / "config.json").write_bytes(config)
    if state:
        (run / "last.state.pt").write_bytes(b"")
    return run


def test_open_and_read_config_of_a_good_run(tmp_path):
    run = _run(tmp_path, json.dumps({"task": "classify", "train": {"epochs": 2}}).encode())
    assert RunDir.open(run).read_config()["train"] == {"epochs": 2}
    assert read_config(run) == read_config(run / "config.json") == RunDir.open(run).read_config()


def test_a_missing_run_folder_is_one_line(tmp_path):
    for call in (lambda: RunDir.open(tmp_path / "nope"), lambda: read_config(tmp_path / "nope")):
        with pytest.raises(ConfigError) as e:
            call()
        assert "'" + str(tmp_path / "nope") + "'" in _one_line(e) and "no such run folder" in str(e.value)


def test_a_missing_config_json_is_one_line_or_none_when_allowed(tmp_path):
    run = _run(tmp_path, config=None)
    with pytest.raises(ConfigError) as e:
        RunDir.open(run).read_config()
    assert "has no config.json" in _one_line(e) and str(run) in str(e.value)
    assert RunDir.open(run).read_config(missing_ok=True) is None


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_a_damaged_config_json_is_one_line(tmp_path, kind):
    run = _run(tmp_path, DAMAGED[kind])
    for missing_ok in (False, True):  # a damaged file is never taken for a missing one
        with pytest.raises(ConfigError) as e:
            RunDir.open(run).read_config(missing_ok=missing_ok)
        assert str(run) in _one_line(e) and "config.json" in str(e.value)
    with pytest.raises(ConfigError, match="not readable JSON|holds a JSON list"):
        read_config(run / "config.json")


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_resume_and_recipe_of_a_damaged_run_say_which_and_what(tmp_path, capsys, kind):
    """The CLI readers of a run: --resume (each training command) and --recipe."""
    run = _run(tmp_path, DAMAGED[kind])
    for argv in (["train", "--resume", str(run)], ["pretrain", "--resume", str(run)],
                 ["train-gen", "--resume", str(run)],
                 ["train", "--data", "mnist5k", "--recipe", str(run), "--runs-dir", str(tmp_path / "x")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(run) in err and "config.json" in err, (argv, err)
        assert ("cannot resume" in err) == ("--resume" in argv), err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json", "last.state.pt"]  # nothing touched


@pytest.mark.parametrize("config", [{"task": "classify", "train": {}}, {"task": "classify", "classifier": {}},
                                    {"task": "classify", "train": [], "classifier": {}}])
def test_a_config_without_its_sections_cannot_resume_and_says_so(tmp_path, capsys, config):
    """A config.json of the right task that lacks (or mangles) the task's or the training section: one line naming
    the file and the section, not a KeyError."""
    run = _run(tmp_path, json.dumps(config).encode())
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(run) in err and "section" in err and "cannot resume" in err, err
    missing = "train" if not isinstance(config.get("train"), dict) else "classifier"
    assert repr(missing) in err, err


def test_no_checkpoint_is_refused_in_one_place_with_one_message(tmp_path):
    """A run without last.state.pt: the task's resume (resume_configs) and the engine's own (Trainer.fit, the Python
    API) refuse it with the same words."""
    run = _run(tmp_path, json.dumps({"task": "classify", "train": {}, "classifier": {}}).encode(), state=False)
    with pytest.raises(ConfigError) as by_task:
        train_classifier(ClassifierConfig(data="mnist5k"), TrainConfig(resume=str(run), quiet=True))
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1]), {}

    with pytest.raises(ConfigError) as by_engine:
        Trainer(nn.Linear(4, 2), data, TrainConfig(resume=str(run), batch_size=4, quiet=True), loss_fn).fit()
    assert _one_line(by_task) == _one_line(by_engine)
    assert "no last.state.pt" in str(by_task.value) and "without --resume" in str(by_task.value)
