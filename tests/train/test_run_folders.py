"""Run folders: one owner at a time (an OS lock that dies with its process), name clashes found before the data is
read, --resume that refuses what it cannot change and applies (and records) what it can, no folder left behind by
a run that never saved a checkpoint."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import vitkit
from _runs import Interrupt, kill9, stop_after, tiny_task, tiny_tc
from vitkit.cli import main
from vitkit.data import build_datasets
from vitkit.errors import ConfigError, DataError, RunExistsError
from vitkit.io.checkpoint import read_metadata
from vitkit.tasks.classify import train_classifier
from vitkit.train import Trainer, TrainConfig, TrainingDiverged, claim_run, lr_at, read_metrics

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "global_pool": "avg"}
CLI_TINY = ["train", "--data", "mnist5k", "--max-train", "128", "--max-val", "32", "--epochs", "2",
            "--batch-size", "64", "--model", "vit_mini_patch7_28", "--model-arg", "embed_dim=32",
            "--model-arg", "depth=1", "--model-arg", "num_heads=2", "--quiet"]


def _task(**kw):
    return tiny_task(**{"model_args": TINY, "max_train": 128, "max_val": 32, **kw})


def _tc(tmp_path, name, **kw):
    return tiny_tc(tmp_path, name, **{"epochs": 2, **kw})


def _snapshot(folder):
    """Every file of a run folder but its lock (which a claim that went on to fail rewrote)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.name != ".lock"}


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit: error: ") and "\n" not in err, err
    return err


# ---- item 7: a run that never saved a checkpoint leaves no folder ------------------------------------------------
def test_a_run_that_fails_before_its_first_checkpoint_removes_its_folder(tmp_path):
    train, _, _ = build_datasets("mnist5k", max_train=64, max_val=16)

    def nan_loss(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y) * float("nan"), {}

    cfg = _tc(tmp_path, "dies", epochs=1)
    with pytest.raises(TrainingDiverged, match="step 1"):
        Trainer(vitkit.create_model("vit_mini_patch7_28", **TINY), train, cfg, nan_loss).fit()
    assert not (tmp_path / "dies").exists()  # not a folder with only config.json that blocks the name
    with pytest.raises((DataError, FileNotFoundError)):  # a failure before training (here: the data) too
        train_classifier(_task(data=f"folder:{tmp_path / 'nowhere'}"), _tc(tmp_path, "dies"))
    assert not (tmp_path / "dies").exists()
    # what a run killed in its first epoch leaves (config.json, a temp file, no checkpoint) does not block the
    # name either: --resume says how to restart it, and the same command replaces it
    (tmp_path / "dies").mkdir()
    (tmp_path / "dies" / "config.json").write_text(json.dumps({"task": "classify", "train": {}}))
    (tmp_path / "dies" / ".last.safetensors.abc.tmp").write_bytes(b"half")
    with pytest.raises(ConfigError, match="no last.state.pt.*without --resume"):
        train_classifier(_task(), TrainConfig(resume=str(tmp_path / "dies"), quiet=True))
    summary = train_classifier(_task(), _tc(tmp_path, "dies", epochs=1))
    assert summary["epochs"] == 1 and not list((tmp_path / "dies").glob(".*.tmp"))


# ---- item 1, in one process: the lock and the order of the checks ------------------------------------------------
def test_name_clashes_are_found_before_the_data_is_read_and_a_locked_run_is_never_touched(tmp_path, capsys):
    train_classifier(_task(), _tc(tmp_path, "done", epochs=1))
    before = _snapshot(tmp_path / "done")
    nowhere = _task(data=f"folder:{tmp_path / 'no_such_folder'}")  # reading it would fail: it is never read
    with pytest.raises(RunExistsError, match="--overwrite"):
        train_classifier(nowhere, _tc(tmp_path, "done"))
    # an --overwrite that fails before it starts writing leaves the old run whole
    with pytest.raises((DataError, FileNotFoundError)):
        train_classifier(nowhere, _tc(tmp_path, "done", overwrite=True))
    assert _snapshot(tmp_path / "done") == before

    # while another owner holds the run (a claim on another descriptor conflicts like another process's)
    with claim_run(_tc(tmp_path, "live")) as held:
        assert (held.path / ".lock").read_text().strip() == str(os.getpid())
        for overwrite in (False, True):
            with pytest.raises(RunExistsError, match=f"in use by process {os.getpid()}"):
                train_classifier(nowhere, _tc(tmp_path, "live", overwrite=overwrite))
        with pytest.raises(RunExistsError, match=r"--overwrite refused"):
            train_classifier(nowhere, _tc(tmp_path, "live", overwrite=True))
        with pytest.raises(RunExistsError, match=f"process {os.getpid()} is running it"):
            with claim_run(TrainConfig(resume=str(held.path))):
                pass
        for cmd in ("pretrain", "train-gen"):  # the other training commands share the engine's claim
            assert main([cmd, "--data", f"folder:{tmp_path / 'no_such_folder'}", "--name", "live", "--runs-dir",
                         str(tmp_path), "--overwrite", "--quiet"]) == 2
            assert f"in use by process {os.getpid()}" in _err(capsys)
        assert held.path.is_dir()
    with claim_run(TrainConfig(resume=str(tmp_path / "done"))):  # released: free again
        pass


# ---- item 3: --resume refuses what it cannot change, applies and records what it can ----------------------------
@pytest.fixture
def cut_run(tmp_path):
    """A tiny run interrupted after its first of 3 epochs (so resuming it trains)."""
    with pytest.raises(Interrupt):
        train_classifier(_task(), _tc(tmp_path, "cut", epochs=3), on_epoch_end=stop_after(1))
    return tmp_path / "cut"


def test_resume_refuses_every_flag_that_cannot_change(cut_run, capsys):
    before = _snapshot(cut_run)
    for flags, named in ((["--lr", "5"], "--lr"), (["--data", "folder:/nonexistent"], "--data"),
                         (["--epochs", "10", "--batch-size", "8", "--lr", "5"], "--batch-size, --lr"),
                         (["--data", "mnist5k"], "--data"),  # given, even at its default value
                         (["--name", "other"], "--name"), (["--overwrite"], "--overwrite"),
                         (["--model-arg", "depth=3", "--seed", "1"], "--model-arg, --seed")):
        assert main(["train", "--resume", str(cut_run), "--quiet", *flags]) == 2, flags
        err = _err(capsys)
        assert f"{named} cannot change when a run resumes" in err and "--epochs," in err, err
        assert "--epochs 10" not in err
    for cmd, flags, named in (("pretrain", ["--mask-ratio", "0.5", "--lr", "1"], "--lr, --mask-ratio"),
                              ("train-gen", ["--objective", "ddpm"], "--objective")):
        assert main([cmd, "--resume", str(cut_run), *flags]) == 2
        assert f"{named} cannot change" in _err(capsys)
    with pytest.raises(ConfigError, match=r"--ema, --lr cannot change"):  # the library, too
        train_classifier(_task(), TrainConfig(resume=str(cut_run), lr=5.0, ema_decay=0.9, quiet=True))
    with pytest.raises(ConfigError, match=r"--mixup cannot change"):
        train_classifier(_task(mixup=0.8), TrainConfig(resume=str(cut_run), quiet=True))
    assert _snapshot(cut_run) == before  # refused before anything was written


def test_resume_extends_a_finished_run_and_records_it(cut_run, capsys):
    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 0  # no change: finishes the 3 epochs
    cfg = json.loads((cut_run / "config.json").read_text())
    assert [h["changed"] for h in cfg["history"]] == [{}]
    assert main(["train", "--resume", str(cut_run), "--quiet"]) == 2
    assert "finished already" in (e := _err(capsys)) and "larger --epochs" in e

    assert main(["train", "--resume", str(cut_run), "--epochs", "5", "--workers", "0", "--quiet"]) == 0
    rows = read_metrics(cut_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    state = torch.load(cut_run / "last.state.pt", weights_only=True)
    spe = rows[0]["step"]
    assert state["plan"]["total"] == state["step"] == 5 * spe
    # the cosine laid over the new total from where the run stood: epoch 4's last lr is that curve's
    tc = json.loads((cut_run / "config.json").read_text())["train"]
    want = lr_at(4 * spe - 1, 5 * spe, state["plan"]["warmup"], tc["lr"], tc["min_lr"])
    assert rows[3]["lr"] == pytest.approx(want, rel=1e-4)
    assert rows[3]["lr"] > rows[2]["lr"]  # a finished run's lr was at the floor; extending raises it
    cfg = json.loads((cut_run / "config.json").read_text())
    assert cfg["train"]["epochs"] == 5 and cfg["recipe"]["values"]["epochs"] == 5
    last = cfg["history"][-1]
    assert last["changed"] == {"epochs": {"from": 3, "to": 5}} and last["epoch"] == 3 and last["pid"] == os.getpid()

    assert main(["train", "--resume", str(cut_run), "--epochs", "4", "--quiet"]) == 2
    assert "--epochs 4 is too few" in (e := _err(capsys)) and "has trained 5 epochs" in e
    # a time budget: the run's new total (time used so far included); this run claims to have used 1000 s
    state["elapsed"] = 1000.0
    torch.save(state, cut_run / "last.state.pt")
    assert main(["train", "--resume", str(cut_run), "--time-budget", "10m", "--quiet"]) == 2
    assert "--time-budget 600s is too short" in _err(capsys)
    assert main(["train", "--resume", str(cut_run), "--time-budget", "1002s", "--quiet"]) == 0
    assert torch.load(cut_run / "last.state.pt", weights_only=True)["step"] > 5 * spe
    cfg = json.loads((cut_run / "config.json").read_text())
    assert cfg["train"]["time_budget"] == 1002 and cfg["train"]["epochs"] is None
    assert cfg["history"][-1]["changed"] == {"epochs": {"from": 5, "to": None},
                                             "time_budget": {"from": None, "to": 1002.0}}


# ---- item 1, two processes racing on one run name ----------------------------------------------------------------
def _env(pause=None, until=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("VITKIT_TEST_PAUSE_WRITE", None)
    env.pop("VITKIT_TEST_PAUSE_UNTIL", None)
    if pause:
        env["VITKIT_TEST_PAUSE_WRITE"] = pause
    if until:  # the pause ends when the test creates this file: held exactly as long as the test needs
        env["VITKIT_TEST_PAUSE_UNTIL"] = str(until)
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(args, pause=None, until=None):
    return subprocess.Popen([sys.executable, "-m", "vitkit", *args], env=_env(pause, until), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _old_run(folder):
    """An earlier run's folder for --overwrite to replace."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"seed": 99}}))
    (folder / "old_only.txt").write_text("from the old run")


def _assert_whole_run(folder, seed, epochs=2):
    """The folder is one run's, all of it: its config, every epoch's metrics, loadable weights, the report."""
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["train"]["seed"] == seed
    rows = read_metrics(folder / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    report = json.loads((folder / "report.json").read_text())
    assert report["epochs"] == epochs
    assert report["final"]["train_loss"] == pytest.approx(rows[-1]["train_loss"], rel=1e-5)
    saved = json.loads(read_metadata(folder / "last.safetensors")["metrics"])  # the weights are this run's too
    assert saved["train_loss"] == pytest.approx(rows[-1]["train_loss"], rel=1e-5)
    assert all(torch.isfinite(p).all() for p in vitkit.load(folder / "best.safetensors").parameters())
    assert not (folder / "old_only.txt").exists() and not list(folder.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("first_overwrite", [False, True])
def test_a_second_process_cannot_take_a_live_run(tmp_path, first_overwrite):
    """This process trains; at its first epoch's end another `vitkit train` with the same name starts, without and
    with --overwrite: both are refused, naming this process, and this run ends whole."""
    if first_overwrite:
        _old_run(tmp_path / "race")
    seen = []

    def second(trainer, row):
        if row["epoch"] == 1:
            for extra in ([], ["--overwrite"]):
                p = _spawn([*CLI_TINY, "--name", "race", "--runs-dir", str(tmp_path), "--seed", "2", *extra])
                _, err = p.communicate(timeout=120)
                seen.append((p.returncode, err))

    train_classifier(_task(), _tc(tmp_path, "race", seed=1, overwrite=first_overwrite), on_epoch_end=second)
    assert [rc for rc, _ in seen] == [2, 2]
    for _, err in seen:
        assert f"in use by process {os.getpid()}" in err and "Traceback" not in err, err
    assert "--overwrite refused" in seen[1][1]
    _assert_whole_run(tmp_path / "race", seed=1)


def _wait_paused(proc, folder, pattern):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(folder.glob(pattern)):
            return
        time.sleep(0.01)
    raise AssertionError("the first process never reached its pause: " + proc.stderr.read()[-2000:])


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("first_overwrite", [False, True])
def test_a_live_process_keeps_its_run_against_this_one(tmp_path, first_overwrite):
    """Another process trains (held inside its first checkpoint write); this one tries the same name plainly, with
    --overwrite and with --resume: all refused with that process's pid; the other run then ends whole."""
    run = tmp_path / "race"
    if first_overwrite:
        _old_run(run)
    go = tmp_path / "go"
    p = _spawn([*CLI_TINY, "--name", "race", "--runs-dir", str(tmp_path), "--seed", "2",
                *(["--overwrite"] if first_overwrite else [])], pause="last.state.pt:120", until=go)
    try:
        _wait_paused(p, run, ".last.state.pt.*.tmp")
        for overwrite in (False, True):
            with pytest.raises(RunExistsError, match=f"in use by process {p.pid}"):
                train_classifier(_task(), _tc(tmp_path, "race", seed=1, overwrite=overwrite))
        with pytest.raises(RunExistsError, match=f"process {p.pid} is running it"):
            train_classifier(_task(), TrainConfig(resume=str(run), quiet=True))
        go.touch()  # let the other process finish its write
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-2000:]
    _assert_whole_run(run, seed=2)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_killed_owner_leaves_no_stale_lock(tmp_path, checkpointed):
    """SIGKILL while a run holds its lock (before or after its first checkpoint): the lock dies with it. A run that
    had saved a checkpoint is kept (refused without --overwrite, replaced with it); one that had not is replaced."""
    run = tmp_path / "race"
    pause = "metrics.csv:60" if checkpointed else "last.safetensors:60"
    p = _spawn([*CLI_TINY, "--name", "race", "--runs-dir", str(tmp_path), "--seed", "2"], pause=pause)
    try:
        _wait_paused(p, run, f".{pause.split(':')[0]}.*.tmp")
        time.sleep(0.2)
    finally:
        kill9(p)
    assert (run / ".lock").read_text().strip() == str(p.pid)  # the file stays; its lock died with the process
    if checkpointed:
        with pytest.raises(RunExistsError, match="exists already; pass --overwrite"):
            train_classifier(_task(), _tc(tmp_path, "race", seed=1))
        assert (run / "last.state.pt").is_file()
    train_classifier(_task(), _tc(tmp_path, "race", seed=1, overwrite=checkpointed))
    _assert_whole_run(run, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_started_together(tmp_path):
    """Two `vitkit train` with one name started at once, the second with --overwrite: whichever claims the name
    first trains (each claims it on start, seconds before either could end), the other is refused naming it;
    never two runs in one folder (before the lock: both exited 0, one run deleted under the other)."""
    go = tmp_path / "go"  # the winner is held inside its first checkpoint until the loser has been refused
    procs = {seed: _spawn([*CLI_TINY, "--name", "race", "--runs-dir", str(tmp_path), "--seed", str(seed), *extra],
                          pause="last.state.pt:120", until=go)
             for seed, extra in ((1, []), (2, ["--overwrite"]))}
    deadline = time.time() + 120
    while all(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    out = {seed: (p.communicate(timeout=180)[1], p.returncode) for seed, p in procs.items()}
    winners = [seed for seed, (_, rc) in out.items() if rc == 0]
    assert len(winners) == 1, out
    loser = 3 - winners[0]
    assert out[loser][1] == 2 and f"in use by process {procs[winners[0]].pid}" in out[loser][0], out
    _assert_whole_run(tmp_path / "race", seed=winners[0])
