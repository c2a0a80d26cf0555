"""Past one process group on one machine, simulated on this one with gloo on the loopback, all weights compared
(≤ 1e-5, the qkv key biases included: the trainer holds them still). From a tiny image folder, 2 epochs of 5 steps:
FSDP in 2 processes equals DDP in 2 simulated nodes of 2 processes (two torchrun --nnodes 2 agents, c10d rendezvous
on 127.0.0.1) and one process; a DDP worker SIGKILLed mid-run is restarted by torchrun (--max-restarts) and the run
ends as the uninterrupted FSDP and 1-process ones. From the same images as shards read in 4 streams: an FSDP run
in 2 processes, killed after a mid-epoch checkpoint, resumes in 1 process and in 2 nodes of 2 and ends as one
process trained throughout (so 1, 2 and 4 processes read the same batches from shards).

The launches are shared: the 1-process runs, the uninterrupted FSDP run and the cut one are module fixtures."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitkit
from vitkit.cli import main
from vitkit.data.shards import write_shards
from vitkit.train import TrainConfig, elastic_resume

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
# fp32, no stochastic layers, a small lr: 87 training images → 5 steps of 16 an epoch
ARGS = ["train", "--model", "vit_mini_patch7_28", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
        "--depth", "2", "--num-heads", "2", "--drop-path", "0", "--patch-drop", "0", "--epochs", "2",
        "--batch-size", "16", "--lr", "1e-4", "--precision", "fp32", "--quiet"]
TOL = 1e-5


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    """(folder of 96 16x16 PNGs in 3 classes, the runs folder, the environment of every launch)."""
    root = tmp_path_factory.mktemp("multinode")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(32):
            a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            a[..., c] = np.clip(a[..., c].astype(int) + 80, 0, 255)
            Image.fromarray(a).save(root / "imgs" / f"class{c}" / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", VITKIT_CACHE=str(root / "cache"))
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("VITKIT_TEST_CRASH", None)
    with pytest.MonkeyPatch.context() as mp:  # the in-process runs decode into the same private cache
        mp.setenv("VITKIT_CACHE", env["VITKIT_CACHE"])
        yield root / "imgs", root / "runs", env


def _args(where, name, *extra):
    data, runs, _ = where
    return [*ARGS, "--data", f"folder:{data}", "--runs-dir", str(runs), "--name", name, *extra]


@pytest.fixture(scope="module")
def shards(where):
    """The folder's training images as 4 shards (22, 22, 22, 21 samples), the same held-out ones as a fifth."""
    out = where[0].parent / "wds"
    write_shards(f"folder:{where[0]}", out, max_count=22, progress=False)
    return out


def _shard_args(where, shards, name):
    """Training from the shards in 4 streams (4 samples of each a step), checkpoints every 3 steps too."""
    return [*ARGS, "--data", f"wds:{shards}", "--streams", "4", "--save-every", "3", "--runs-dir", str(where[1]),
            "--name", name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(where, args, nproc=2, launcher=("--standalone",), crash=None, check=True):
    """`torchrun [launcher] --nproc-per-node N -m vitkit ARGS` (started, not waited for when check is None)."""
    env = dict(where[2])
    if crash:
        env["VITKIT_TEST_CRASH"] = crash
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}", "-m", "vitkit",
           *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if check is None:
        return proc
    _, err = proc.communicate(timeout=150)
    if check:
        assert proc.returncode == 0, err[-4000:]
    return proc.returncode, err


def _two_nodes(where, args, nproc=2):
    """Two torchrun agents, as two machines would start them, meeting at a c10d rendezvous on 127.0.0.1."""
    port = _free_port()
    procs = [_torchrun(where, args, nproc, ("--nnodes=2", f"--node-rank={n}", "--rdzv-backend=c10d",
                                            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test2x2"), check=None)
             for n in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-4000:]


def _weights(run):
    return load_file(str(run / "last.safetensors"))


def _diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one(where):
    """The reference: one process, the default strategy."""
    assert main(_args(where, "one")) == 0
    return where[1] / "one"


@pytest.fixture(scope="module")
def fsdp2(where):
    """FSDP in 2 processes, uninterrupted."""
    _torchrun(where, _args(where, "fsdp2", "--strategy", "fsdp"))
    return where[1] / "fsdp2"


@pytest.fixture(scope="module")
def shards_one(where, shards):
    """The shards' reference: one process."""
    assert main(_shard_args(where, shards, "shards_one")) == 0
    return where[1] / "shards_one"


@pytest.fixture(scope="module")
def cut(where, shards):
    """FSDP in 2 processes from the shards, rank 1 SIGKILLed after step 7 and no restarts allowed: the folder keeps
    the sharded checkpoint of step 6 (epoch 2, batch 1)."""
    rc, _ = _torchrun(where, [*_shard_args(where, shards, "cut"), "--strategy", "fsdp"], crash="1:7", check=False)
    assert rc != 0
    return where[1] / "cut"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_in_two_processes_equals_ddp_in_two_nodes_of_two_and_one_process(where, one, fsdp2):
    _two_nodes(where, _args(where, "ddp2x2"))
    ref, ddp, fsdp = _weights(one), _weights(where[1] / "ddp2x2"), _weights(fsdp2)
    assert _diff(fsdp, ref) <= TOL and _diff(fsdp, ddp) <= TOL and _diff(ddp, ref) <= TOL
    assert json.loads((where[1] / "ddp2x2" / "config.json").read_text())["world_size"] == 4
    # FSDP's files: the full weights as one vitkit checkpoint; the training state sharded, one file per process
    cfg = json.loads((fsdp2 / "config.json").read_text())
    assert cfg["train"]["strategy"] == "fsdp" and cfg["world_size"] == 2
    model = vitkit.load(fsdp2 / "last.safetensors")
    assert model(torch.zeros(1, model.config.in_chans, 16, 16)).shape == (1, 3)
    state = torch.load(fsdp2 / "last.state.pt", weights_only=True)
    assert state["sharded"] == "state.dcp/step-000000010" and "model" not in state and "optimizer" not in state
    assert sorted(p.name for p in (fsdp2 / "state.dcp").iterdir()) == ["step-000000010"]  # older steps removed
    assert {p.name for p in (fsdp2 / state["sharded"]).iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sharded_checkpoint_of_two_processes_resumes_in_one_and_in_two_nodes_of_two(where, shards_one, cut):
    cfg = json.loads((cut / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["streams"] == 4
    state = torch.load(cut / "last.state.pt", weights_only=True)
    assert state["step"] == 6 and (state["data_pos"]["epoch"], state["data_pos"]["batch"]) == (1, 1)
    in_one, in_four = where[1] / "cut_in_1", where[1] / "cut_in_2x2"
    shutil.copytree(cut, in_one)
    shutil.copytree(cut, in_four)
    assert main(["train", "--resume", str(in_one), "--quiet"]) == 0
    _two_nodes(where, ["train", "--resume", str(in_four), "--quiet"])
    full = _weights(shards_one)
    for run, world in ((in_one, 1), (in_four, 4)):
        cfg = json.loads((run / "config.json").read_text())
        assert [(h["step"], h["world_size"]) for h in cfg["history"]] == [(6, world)]
        assert _diff(_weights(run), full) <= TOL
    assert _diff(_weights(cut), full) > 5 * TOL  # ... where 4 steps fewer are far off (measured: 1.4e-4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_an_uninterrupted_one(where, one, fsdp2):
    _, err = _torchrun(where, _args(where, "kill"), launcher=("--standalone", "--max-restarts=1"), crash="1:7")
    assert "exitcode: -9" in err  # rank 1 died of SIGKILL ...
    run = where[1] / "kill"
    cfg = json.loads((run / "config.json").read_text())
    # ... and the restarted group resumed its own run from the epoch-1 checkpoint (its first attempt's launch)
    assert [(h["step"], h["launch"]) for h in cfg["history"]] == [(5, cfg["launch"])]
    assert _diff(_weights(run), _weights(fsdp2)) <= TOL and _diff(_weights(run), _weights(one)) <= TOL


def test_elastic_resume_continues_only_a_run_of_the_same_launch(tmp_path, monkeypatch):
    """A command torchrun starts again resumes its run folder when the same launch (rendezvous id, one of the same
    agents) wrote it; another launch's run of the same name is left to the "run exists" refusal."""
    run = tmp_path / "r"
    run.mkdir()
    me = f"{socket.gethostname()}:{os.getppid()}"
    cfg = TrainConfig(name="r", runs_dir=str(tmp_path), overwrite=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def resumes(config: dict, state=True, run_id="job1") -> bool:
        (run / "config.json").write_text(json.dumps(config))
        (run / "last.state.pt").unlink(missing_ok=True)
        if state:
            (run / "last.state.pt").write_bytes(b"x")
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        out = elastic_resume(cfg)
        assert (out.resume, out.overwrite) in ((None, True), (str(run), False))
        return out.resume is not None

    ours = {"run_id": "job1", "agents": ["elsewhere:1", me]}
    assert resumes({"launch": ours})
    assert resumes({"launch": {"run_id": "job1", "agents": ["gone:7"]}, "history": [{"launch": ours}]})
    assert not resumes({"launch": ours}, run_id="job2")
    assert not resumes({"launch": {"run_id": "job1", "agents": ["elsewhere:1"]}})
    assert not resumes({"launch": ours}, state=False)  # no checkpoint yet: the run starts again from scratch
    assert not resumes({"launch": None})
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert elastic_resume(cfg) is cfg  # not under torchrun


def test_one_process_fsdp_writes_sharded_state_and_a_resume_keeps_the_strategy(tmp_path):
    """In one process `strategy="fsdp"` shards nothing but still checkpoints with DCP (so the run can resume in
    any number of processes), resumes from it, and refuses to resume as DDP."""
    from vitkit.data import InMemoryDataset
    from vitkit.errors import ConfigError
    from vitkit.train import Trainer

    images = torch.randint(0, 255, (32, 1, 28, 28), dtype=torch.uint8)
    data = InMemoryDataset(images, torch.arange(32) % 10)

    def fit(**kw):
        model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2)
        cfg = TrainConfig(**{"name": "f", "runs_dir": str(tmp_path), "batch_size": 16, "quiet": True, **kw})
        return Trainer(model, data, cfg, lambda net, b: (torch.nn.functional.cross_entropy(net(b[0]), b[1]), {}),
                       ).fit()

    fit(epochs=1, strategy="fsdp", ema_decay=0.9)
    state = torch.load(tmp_path / "f" / "last.state.pt", weights_only=True)
    assert state["sharded"] == "state.dcp/step-000000002" and state["ema_updates"] == 2
    with pytest.raises(ConfigError, match="trained with --strategy fsdp"):
        fit(resume=str(tmp_path / "f"), epochs=2, ema_decay=0.9)
    assert fit(resume=str(tmp_path / "f"), epochs=2, strategy="fsdp", ema_decay=0.9)["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "f" / "state.dcp").iterdir()) == ["step-000000004"]
