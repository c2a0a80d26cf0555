"""Files written by vitkit 0.1.0 (commit 75e11c6, before issue 14's refactor) still load, give the same numbers
and work with every command that reads them: checkpoints, run folders (eval, resume, fine-tune from MAE),
embeddings and an index. The fixtures are in tests/fixtures/v0_1_0 (see its make_expected.py); never regenerate
them with later code. Each test works on a copy, so a command that writes next to its input leaves them as they are."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vitkit
from vitkit.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v0_1_0"


@pytest.fixture
def old(tmp_path):
    """A writable copy of the 0.1.0 fixtures."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "v0_1_0"))


def _inputs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_expected", FIXTURES / "make_expected.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoints_give_the_outputs_they_gave_when_written(old):
    expected = load_file(FIXTURES / "expected.safetensors")
    got = _inputs().outputs(old)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        assert torch.allclose(got[name], want, rtol=1e-5, atol=1e-5), (name, (got[name] - want).abs().max())


def test_old_metadata_reads_into_the_same_preprocessing_and_classes(old):
    model = vitkit.load(old / "runs" / "cls" / "best.safetensors")
    with safe_open(str(old / "runs" / "cls" / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    saved = json.loads(meta["pretrained_cfg"])
    assert saved["class_names"] == [str(i) for i in range(10)] and saved["dataset"] == "mnist5k"
    cfg = model.pretrained_cfg
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    assert cfg == saved


def test_old_checkpoints_still_say_how_they_were_trained(old):
    """Before checkpoints carried the run's report, every save recorded its epoch, step and metrics: those are what
    `read_training` (the serve model card's source for a bare checkpoint) gives for an old file."""
    from vitkit.io.checkpoint import read_training

    rec = read_training(old / "runs" / "cls" / "best.safetensors")
    report = json.loads((old / "runs" / "cls" / "report.json").read_text())
    assert rec["run"] == "cls" and rec["epoch"] == report["best_epoch"] and rec["steps"] == report["steps"]
    assert rec["metrics"]["top1"] == pytest.approx(report["final"]["top1"]) and "report" not in rec


def test_eval_of_an_old_run_folder_repeats_its_report(old, tmp_path, capsys):
    report = json.loads((old / "runs" / "cls" / "report.json").read_text())
    rc = main(["eval", str(old / "runs" / "cls"), "--data", "mnist5k", "--max-val", "32", "--out", str(tmp_path / "ev"),
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1"] == pytest.approx(report["eval"]["top1"], abs=1e-3)  # the JSON rounds
    assert out["val_loss"] == pytest.approx(report["eval"]["val_loss"], abs=1e-4)


def test_an_old_run_resumes_and_trains_on(old):
    run = old / "runs" / "cls"
    rc = main(["train", "--resume", str(run), "--epochs", "2", "--max-steps", "5", "--quiet"])
    assert rc == 0
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert int(rows[-1].split(",")[header.index("step")]) == 5
    assert json.loads((run / "report.json").read_text())["steps"] == 5


def test_an_old_mae_run_initialises_a_classifier(old, tmp_path):
    rc = main(["train", "--data", "mnist5k", "--init", str(old / "runs" / "mae"), "--name", "ft", "--runs-dir",
               str(tmp_path), "--max-steps", "1", "--batch-size", "16", "--max-train", "64", "--max-val", "16",
               "--quiet", "--no-compile", "--precision", "fp32"])
    assert rc == 0
    enc = vitkit.load(tmp_path / "ft" / "last.safetensors")
    assert enc.config.embed_dim == 16 and enc.config.depth == 1


def test_old_embeddings_and_index_search_as_before(old, tmp_path, capsys):
    emb = load_file(old / "embeddings.safetensors")["embeddings"]
    index = vitkit.Index.load(old / "index")
    scores, ids = index.search(emb[:3].numpy(), k=3)
    assert np.array_equal(ids[:, 0], np.arange(3))  # each vector's nearest neighbour is itself
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    query = sorted((old / "images").rglob("*.png"))[0]
    rc = main(["search", str(old / "index"), str(query), "--k", "2", "--checkpoint", str(old / "runs" / "cls"),
               "--grid", str(tmp_path / "grid.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert query.name in out


@pytest.mark.parametrize("argv", [
    ["predict", "{dit}", "{img}"], ["eval", "{dit}", "--data", "mnist5k"], ["embed", "{dit}", "{imgs}", "--out", "{tmp}/e"],
    ["eval-retrieval", "{dit}", "--data", "mnist5k"], ["export", "{dit}", "--format", "onnx", "--out", "{tmp}/x.onnx"],
    ["train", "--data", "mnist5k", "--init", "{dit}", "--runs-dir", "{tmp}", "--max-steps", "1"],
    ["explain", "{dit}", "{img}", "--out", "{tmp}/ex"],
], ids=lambda a: a[0] if a[0] != "train" else "train-init")
def test_a_dit_where_a_vit_is_needed_is_one_line(old, tmp_path, capsys, argv):
    """A generator's checkpoint given to a command that reads a ViT: one line saying what the file holds (these were
    TypeError/AttributeError tracebacks), and no file written."""
    img = sorted((old / "images").rglob("*.png"))[0]
    argv = [a.format(dit=old / "runs" / "dit", img=img, imgs=old / "images", tmp=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a DiT, not a ViT" in err, err
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # train may leave its empty runs folder
