"""End to end through the real CLI on a few hundred mnist5k images and a handful of steps: MAE pretraining,
reconstruction, fine-tuning from MAE, DiT training, generation (seeded, refusing unknown classes) and scoring."""
import json

import numpy as np
import pytest
import torch

from vitkit.cli import main
from _runs import Interrupt, stop_after

pytestmark = pytest.mark.slow

QUICK = ["--max-train", "200", "--max-val", "100", "--epochs", "1", "--max-steps", "3", "--batch-size", "50",
         "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def mae_run(runs):
    rc = main(["pretrain", "--method", "mae", "--data", "mnist5k", "--runs-dir", str(runs), "--name", "mae",
               "--model-arg", "depth=2", "--decoder-depth", "1", "--decoder-dim", "32", "--decoder-heads", "2", *QUICK])
    assert rc == 0
    return runs / "mae"


@pytest.fixture(scope="module")
def dit_run(runs):
    quick = [a for a in QUICK if a not in ("--epochs", "1")] + ["--time-budget", "10m"]  # the budget path
    rc = main(["train-gen", "--data", "mnist5k", "--runs-dir", str(runs), "--name", "dit", "--model-arg",
               "embed_dim=32", "--model-arg", "depth=1", "--model-arg", "num_heads=2", "--sample-steps", "2", *quick])
    assert rc == 0
    return runs / "dit"


def test_pretrain_writes_a_run_and_an_mae_checkpoint(mae_run):
    import vitkit
    from vitkit.models.mae import MaskedAutoencoderViT

    for f in ("config.json", "metrics.csv", "last.safetensors", "last.state.pt", "report.json", "report.md",
              "reconstructions.png"):
        assert (mae_run / f).is_file(), f
    cfg = json.loads((mae_run / "config.json").read_text())
    assert cfg["task"] == "mae" and cfg["model"]["mask_ratio"] == 0.75 and cfg["model"]["norm_pix_loss"] is True
    report = json.loads((mae_run / "report.json").read_text())
    assert report["steps"] == 3 and np.isfinite(report["final"]["val_loss"])
    m = vitkit.load(mae_run)
    assert isinstance(m, MaskedAutoencoderViT) and m.config.depth == 2 and m.config.decoder_embed_dim == 32


def test_reconstruct_writes_the_grid(mae_run, tmp_path, capsys):
    from PIL import Image
    from PIL import ImageChops

    from vitkit.data import build_datasets

    _, val, _ = build_datasets("mnist5k", augment="none")
    paths = []
    for i in range(3):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(val.images[i, 0].numpy()).save(p)
        paths.append(str(p))
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(mae_run), *paths, "--mask-ratio", "0.5", "--seed", "1", "--out", str(out)]) == 0
    img = Image.open(out)
    # 3 rows x 4 columns of 28 px images with 2 px padding, upscaled 3x
    assert img.size == ((4 * 30 + 2) * 3, (3 * 30 + 2) * 3)
    out2 = tmp_path / "rec2.png"
    assert main(["reconstruct", str(mae_run), *paths, "--mask-ratio", "0.5", "--seed", "1", "--out", str(out2)]) == 0
    assert ImageChops.difference(img.convert("L"), Image.open(out2).convert("L")).getbbox() is None  # seeded
    # a DiT is not an MAE
    assert main(["reconstruct", str(mae_run / "config.json"), *paths]) == 2


def test_train_init_from_mae_fine_tunes_the_encoder(mae_run, runs):
    import vitkit

    rc = main(["train", "--data", "mnist5k", "--init", str(mae_run), "--runs-dir", str(runs), "--name", "ft",
               "--max-train", "100", "--max-val", "100", "--epochs", "1", "--max-steps", "1", "--batch-size", "50",
               "--quiet"])
    assert rc == 0
    clf = vitkit.load(runs / "ft")
    assert type(clf).__name__ == "VisionTransformer" and clf.num_classes == 10 and clf.config.depth == 2


def test_train_gen_writes_a_run_and_samples(dit_run):
    import vitkit
    from vitkit.models.dit import DiT

    for f in ("config.json", "metrics.csv", "last.safetensors", "report.json", "samples.png"):
        assert (dit_run / f).is_file(), f
    cfg = json.loads((dit_run / "config.json").read_text())
    assert cfg["task"] == "generate" and cfg["model"]["objective"] == "flow" and cfg["model"]["embed_dim"] == 32
    assert cfg["train"]["ema_decay"] > 0  # sampling uses EMA weights
    m = vitkit.load(dit_run)
    assert isinstance(m, DiT) and m.pretrained_cfg["mean"] == [0.5]


def test_generate_is_seeded_and_writes_png_and_npy(dit_run, tmp_path):
    out = tmp_path / "g"
    args = ["generate", str(dit_run), "--class", "3", "-n", "4", "--steps", "3", "--cfg", "2.0", "--out", str(out)]
    assert main([*args, "--seed", "0"]) == 0
    stem = "class3_n4_steps3_cfg2_seed0"
    a = np.load(out / f"{stem}.npy")
    assert a.shape == (4, 1, 28, 28) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert (np.load(out / f"{stem}_labels.npy") == 3).all()
    assert (out / f"{stem}.png").is_file()
    assert main([*args, "--seed", "0", "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(a, np.load(tmp_path / "again" / f"{stem}.npy"))
    assert main([*args, "--seed", "1"]) == 0
    assert not np.allclose(a, np.load(out / "class3_n4_steps3_cfg2_seed1.npy"))


def test_generate_refuses_an_unknown_class(dit_run, tmp_path, capsys):
    rc = main(["generate", str(dit_run), "--class", "12", "-n", "2", "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "class 12 is not one this checkpoint was trained on" in err and "0..9" in err
    assert not list(tmp_path.glob("*.npy"))


def test_generate_scores_with_a_classifier(dit_run, runs, tmp_path):
    assert main(["train", "--data", "mnist5k", "--runs-dir", str(runs), "--name", "clf", "--max-train", "100",
                 "--max-val", "100", "--epochs", "1", "--max-steps", "1", "--batch-size", "50", "--quiet"]) == 0
    out = tmp_path / "s"
    assert main(["generate", str(dit_run), "-n", "3", "--steps", "2", "--out", str(out), "--classifier",
                 str(runs / "clf")]) == 0
    scores = json.loads((out / "all_n3_steps2_cfg2_seed0_scores.json").read_text())
    assert scores["num_samples"] == 30 and 0 <= scores["conditional_accuracy"] <= 100
    assert np.isfinite(scores["classifier_fid"]) and scores["classifier_fid_floor_train_vs_test"] >= 0
    assert scores["num_real_train"] == 30 and set(scores["per_class_accuracy"]) == {str(c) for c in range(10)}


def _frechet_by_eigh(a, b):
    """The Fréchet distance computed another way: tr((ΣaΣb)^½) as tr((Σa^½ Σb Σa^½)^½), both symmetric square roots
    from eigendecompositions (no scipy.linalg.sqrtm of a non-symmetric product, which vitkit uses)."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_frechet_distance_matches_closed_forms_and_an_independent_computation():
    from vitkit.tasks.generate import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    d1 = frechet_distance(a, a + 1.0)
    assert abs(d1 - 8.0) < 1e-6  # |Δμ|² = 8 with the same covariance
    # b = 2a: μb = 2μa, Σb = 4Σa, so FD = |μa|² + tr(Σa + 4Σa − 2·2Σa) = |μa|² + tr(Σa) (≈ 8 here)
    closed = float((a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, a * 2.0) == pytest.approx(closed, rel=1e-9, abs=1e-9)
    # two unrelated sets with different means and correlated covariances
    b = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) * 0.7 + rng.normal(size=8)
    expect = _frechet_by_eigh(a, b)
    assert expect > 1.0 and frechet_distance(a, b) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expect, rel=1e-8)  # symmetric


def test_train_gen_init_continues_from_a_checkpoint(dit_run, runs, capsys):
    import vitkit

    small = ["--model-arg", "embed_dim=32", "--model-arg", "depth=1", "--model-arg", "num_heads=2"]
    base = ["train-gen", "--data", "mnist5k", "--runs-dir", str(runs), "--init", str(dit_run), "--max-train", "100",
            "--max-val", "50", "--epochs", "1", "--max-steps", "1", "--batch-size", "50", "--sample-steps", "1",
            "--quiet"]
    assert main([*base, "--name", "dit_more", *small]) == 0
    before, after = vitkit.load(dit_run), vitkit.load(runs / "dit_more")
    assert not torch.equal(before.final_layer.linear.weight, after.final_layer.linear.weight)  # it trained on
    capsys.readouterr()
    assert main([*base, "--name", "dit_bad", "--model-arg", "embed_dim=64", "--model-arg", "depth=1"]) == 2
    assert "differs from this run's DiT in embed_dim (32 vs 64)" in capsys.readouterr().err


def test_pretrain_resume_ends_bit_identical(tmp_path):
    """MAE pretraining uses the engine's resume: a run cut after its first epoch and continued with
    `vitkit pretrain --resume` ends with exactly the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from vitkit.tasks.mae import MAETaskConfig, pretrain_mae
    from vitkit.train import TrainConfig

    task = MAETaskConfig(model_args={"embed_dim": 32, "depth": 1, "num_heads": 2}, decoder_embed_dim=16,
                         decoder_depth=1, decoder_num_heads=2, max_train=60, max_val=20)

    def tc(name):
        return TrainConfig(name=name, runs_dir=str(tmp_path), epochs=2, batch_size=20, quiet=True)

    pretrain_mae(task, tc("full"))

    with pytest.raises(Interrupt):
        pretrain_mae(task, tc("cut"), on_epoch_end=stop_after(1))
    assert main(["pretrain", "--method", "mae", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
