"""End to end: `vitkit train | eval | predict` on tiny real data, and a one-line error for each bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
import vitkit.data
from vitkit.cli import main
from vitkit.models.tome import apply_tome
from vitkit.tasks.classify import classify_logits, tta_of

from ._digits import color_folder

TINY = ["--model", "vit_mini_patch7_28", "--model-arg", "embed_dim=32", "--model-arg", "depth=2",
        "--model-arg", "num_heads=2", "--model-arg", "global_pool=avg"]


def _digits_as_pngs(folder, n=12):
    """Real held-out digits from mnist5k written as PNG files (what a user would point predict at)."""
    _, val, _ = vitkit.data.build_datasets("mnist5k")
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        Image.fromarray(val.images[i * 83, 0].numpy()).save(folder / f"digit{i:02d}.png")
        labels.append(str(int(val.labels[i * 83])))
    return labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small mnist5k run shared by the tests below (300 digits, 8 epochs)."""
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["train", "--data", "mnist5k", "--max-train", "300", "--max-val", "100", "--epochs", "8",
               "--batch-size", "32", "--lr", "3e-3", "--augment", "light", "--name", "mini", "--runs-dir", str(runs), "--quiet", *TINY])
    assert rc == 0
    return runs / "mini"


def test_train_writes_a_complete_run_folder(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "metrics.csv", "last.safetensors", "last.state.pt", "best.safetensors", "report.json",
            "report.md", "curves.png", "confusion.png"} <= names
    header = (trained / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("epoch", "train_loss", "val_loss", "top1", "top5", "lr", "img_per_s", "seconds"):
        assert col in header
    report = json.loads((trained / "report.json").read_text())
    assert report["epochs"] == 8 and report["eval"]["num_images"] == 100
    assert report["eval"]["top1"] > 25  # 72 steps of a 2-block model on 300 digits: above chance (10%)
    model = vitkit.load(trained)
    assert model.pretrained_cfg["class_names"] == [str(i) for i in range(10)]
    assert model.pretrained_cfg["dataset"] == "mnist5k"
    state = torch.load(trained / "last.state.pt", weights_only=True)  # plain tensors and dicts only
    assert {"optimizer", "rng_cpu", "step", "epoch", "model"} <= set(state)


def test_eval_reports_accuracy_per_class_and_confusion(trained, tmp_path, capsys):
    rc = main(["eval", str(trained), "--data", "mnist5k", "--max-val", "100", "--out", str(tmp_path), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    report = json.loads((trained / "report.json").read_text())
    assert res["top1"] == pytest.approx(report["eval"]["top1"], abs=1e-6)
    assert res["num_images"] == 100 and len(res["per_class"]) == 10
    assert np.asarray(res["confusion"]).sum() == 100 and res["top5"] >= res["top1"]
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "eval_confusion.png").stat().st_size > 1000


def test_predict_names_labels_with_probabilities(trained, tmp_path, capsys):
    _digits_as_pngs(tmp_path / "imgs")
    rc = main(["predict", str(trained / "best.safetensors"), str(tmp_path / "imgs"), str(tmp_path / "imgs" /
               "digit00.png"), "--topk", "3", "--json", "--batch-size", "5"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 13 and res[0]["path"].endswith("digit00.png")
    for r in res:
        assert r["label"] in [str(i) for i in range(10)] and len(r["topk"]) == 3
        probs = [t["prob"] for t in r["topk"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert res[0]["topk"] == res[-1]["topk"]  # the same file gives the same answer in another batch
    rc = main(["predict", str(trained), str(tmp_path / "imgs" / "digit01.png")])
    assert rc == 0 and capsys.readouterr().out.count("\n") == 1


def test_train_on_an_image_folder_counts_corrupt_files(tmp_path, capsys):
    color_folder(tmp_path / "colors")
    (tmp_path / "colors" / "red" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rc = main(["train", "--data", f"folder:{tmp_path / 'colors'}", "--model", "vit_mini_patch4_32",
               "--model-arg", "embed_dim=32", "--model-arg", "depth=1", "--model-arg", "num_heads=2",
               "--model-arg", "img_size=16", "--model-arg", "patch_size=8", "--epochs", "4", "--batch-size", "8",
               "--val-split", "0.25", "--runs-dir", str(tmp_path / "runs"), "--quiet", "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["run_dir"].endswith("colors") and s["skipped_images"] == 1
    assert s["eval"]["top1"] >= 90  # red vs blue is easy: at most one of the 10 held-out images wrong (chance 50%)
    cfg = json.loads((tmp_path / "runs" / "colors" / "config.json").read_text())
    assert cfg["data"]["skipped"] == 1 and cfg["data"]["class_names"] == ["blue", "red"]
    assert main(["eval", str(tmp_path / "runs" / "colors"), "--json"]) == 0  # dataset and split from the run
    ev = json.loads(capsys.readouterr().out)
    assert ev["num_images"] == s["eval"]["num_images"] == 10
    assert ev["top1"] == pytest.approx(s["eval"]["top1"], abs=1e-3)  # the same model on the same held-out images
    reds = [str(tmp_path / "colors" / "red" / f"{i}.jpg") for i in range(20)]
    assert main(["predict", str(tmp_path / "runs" / "colors"), *reds, "--json"]) == 0
    assert sum(r["label"] == "red" for r in json.loads(capsys.readouterr().out)) >= 18


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors_and_overwrite_nothing(trained, tmp_path, capsys):
    assert main(["train", "--data", "mnist6k", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown dataset 'mnist6k'" in (e := _err(capsys)) and "mnist5k" in e and "cifar10" in e
    assert not (tmp_path / "mnist6k").exists()

    assert main(["predict", str(trained), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in _err(capsys)

    assert main(["predict", str(tmp_path / "nope.safetensors"), str(tmp_path)]) == 2
    assert "does not exist" in _err(capsys)

    # a checkpoint from another model: a plain (non-vitkit) safetensors file, and a 10-class model on 2 classes
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    assert main(["eval", str(tmp_path / "foreign.safetensors"), "--data", "mnist5k"]) == 2
    assert "not a vitkit checkpoint" in _err(capsys)
    color_folder(tmp_path / "colors")
    assert main(["eval", str(trained), "--data", f"folder:{tmp_path / 'colors'}", "--out", str(tmp_path)]) == 2
    assert "10 classes" in _err(capsys)
    other = vitkit.create_model("vit_mini_patch4_28", num_classes=10)
    state = vitkit.load(trained).state_dict()
    with pytest.raises(vitkit.CheckpointError, match="shape mismatch"):
        vitkit.io.load_state_dict_checked(other, state)

    (tmp_path / "colors" / "green").mkdir()
    assert main(["train", "--data", f"folder:{tmp_path / 'colors'}", "--runs-dir", str(tmp_path / "r")]) == 2
    assert "green" in _err(capsys)

    (tmp_path / "colors" / "green").rmdir()
    (tmp_path / "colors" / "red" / "cut.jpg").write_bytes((tmp_path / "colors" / "red" / "0.jpg").read_bytes()[:40])
    assert main(["train", "--data", f"folder:{tmp_path / 'colors'}", "--strict", "--runs-dir",
                 str(tmp_path / "r")]) == 2
    assert "cut.jpg" in _err(capsys)

    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    assert main(["train", "--data", "mnist5k", "--name", trained.name, "--runs-dir", str(trained.parent)]) == 2
    assert "--overwrite" in _err(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before

    assert main(["train", "--time-budget", "soon", "--runs-dir", str(tmp_path)]) == 2
    assert "duration" in _err(capsys)


def test_train_init_from_a_timm_state_dict_at_a_new_size(tmp_path, capsys):
    """`vitkit train --init` takes a foreign (timm-layout .pth) checkpoint: its own architecture and channels,
    resampled to --img-size, with a new head for the data's classes; the dataset recipe's model is not forced."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1,
                            embed_dim=32, depth=2, num_heads=2, num_classes=5)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    rc = main(["train", "--data", "mnist5k", "--init", str(tmp_path / "timm.pth"), "--num-heads", "2",
               "--img-size", "48", "--max-train", "60", "--max-val", "20", "--epochs", "1", "--batch-size", "20",
               "--name", "ft", "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    model = vitkit.load(tmp_path / "runs" / "ft" / "last.safetensors")
    assert model.config.embed_dim == 32 and model.config.img_size == 48 and model.num_classes == 10
    assert model.pos_embed.shape[1] == 1 + 6 * 6
    # the transformer blocks started from the checkpoint, not from a fresh init
    assert (model.blocks[0].mlp.fc1.weight - ref.blocks[0].mlp.fc1.weight).abs().mean() < \
        ref.blocks[0].mlp.fc1.weight.abs().mean()


def test_time_budget_none_switches_to_epochs(tmp_path, capsys):
    rc = main(["train", "--data", "mnist5k", "--time-budget", "none", "--epochs", "1", "--max-train", "40",
               "--max-val", "20", "--batch-size", "20", "--name", "nb", "--runs-dir", str(tmp_path), "--quiet", *TINY])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "nb" / "config.json").read_text())
    assert cfg["train"]["time_budget"] is None and cfg["train"]["epochs"] == 1
    # on --resume, 'none' alone would read as "not given" (the run would keep its budget): refused, one line
    assert main(["train", "--resume", str(tmp_path / "nb"), "--time-budget", "none", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--time-budget none with --resume" in err and "--epochs N" in err and len(err.splitlines()) == 1


def test_fast_and_tome_flags(trained, tmp_path, capsys):
    """--fast --precision fp32 (the exact fast path) gives the plain model's probabilities; --fast alone (auto)
    its top-1 labels, and says which precision it picked; --tome R runs eval with merged tokens."""
    _digits_as_pngs(tmp_path / "imgs", n=6)
    assert main(["predict", str(trained), str(tmp_path / "imgs"), "--json", "--topk", "3"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["predict", str(trained), str(tmp_path / "imgs"), "--json", "--topk", "3", "--precision", "fp32"]) == 0
    fast = json.loads(capsys.readouterr().out)
    for a, b in zip(plain, fast):
        assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]
        assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a["topk"], b["topk"])) <= 1e-4
    assert main(["predict", str(trained), str(tmp_path / "imgs"), "--json", "--topk", "3", "--fast"]) == 0
    assert [a["label"] for a in plain] == [b["label"] for b in json.loads(capsys.readouterr().out)]
    assert main(["eval", str(trained), "--data", "mnist5k", "--max-val", "100", "--fast", "--json",
                 "--out", str(tmp_path / "evf")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fast"] and res["precision"] in ("fp32", "bf16", "int8")
    # auto measured every candidate this machine has (int8 at least, on the oneDNN path) and recorded it
    assert set(res["precision_choice"]["seconds"]) == {"fp32", *res["precision_choice"]["agreement"]}
    assert res["precision_choice"]["precision"] == res["precision"]
    assert json.loads((tmp_path / "evf" / "eval.json").read_text())["precision"] == res["precision"]
    assert main(["eval", str(trained), "--data", "mnist5k", "--max-val", "100", "--tome", "2", "--json",
                 "--out", str(tmp_path / "ev")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tome_r"] == 2 and res["num_images"] == 100
    # the same figures as applying ToMe to the checkpoint by hand and scoring the same 100 held-out digits; the
    # plain model's loss on them differs by far more than that tolerance (merging changes the outputs), but little
    model = vitkit.load(trained)
    _, val, _ = vitkit.data.build_datasets("mnist5k", augment="none", max_val=100, mean=model.pretrained_cfg["mean"],
                                           std=model.pretrained_cfg["std"])
    x, y = next(iter(vitkit.data.make_loader(val, 100, train=False)))
    views = tta_of(model.pretrained_cfg)  # the test-time views the run planned and eval averages
    with torch.no_grad():
        plain = classify_logits(model, x, *views)
        merged = classify_logits(apply_tome(model, 2), x, *views)
    loss, top1 = F.cross_entropy(merged, y).item(), 100.0 * (merged.argmax(1) == y).float().mean().item()
    assert res["val_loss"] == pytest.approx(loss, abs=2e-5), (res["val_loss"], loss)
    assert abs(res["top1"] - top1) <= 1.0 + 1e-6, (res["top1"], top1)  # one borderline digit may tip
    plain_loss = F.cross_entropy(plain, y).item()
    assert 1e-4 < abs(loss - plain_loss) < 0.05 * plain_loss, (loss, plain_loss)


def _digit_folder(root, classes: dict, n_val=15):
    """PATH/train/<name>/ (one digit each) and PATH/val/<name>/ (n_val held-out mnist5k digits of that class):
    `classes` maps each folder name to the digit its images show. Returns {name: [val files]}."""
    _, val, _ = vitkit.data.build_datasets("mnist5k")
    out = {}
    for name, digit in classes.items():
        idx = torch.nonzero(val.labels == digit).flatten()[: n_val + 1].tolist()
        for part, ids in (("train", idx[:1]), ("val", idx[1:])):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in ids:
                Image.fromarray(val.images[i, 0].numpy()).save(root / part / name / f"{i}.png")
        out[name] = sorted((root / "val" / name).iterdir())
    return out


def test_eval_matches_classes_by_name_on_a_subset_and_through_a_class_map(trained, tmp_path, capsys):
    """A folder of two of the checkpoint's ten classes is scored with the checkpoint's indices; folders named
    otherwise are an error listing them, unless --class-map maps them; a same-count folder of other names (scored
    by position before, without a word) is refused."""
    files = _digit_folder(tmp_path / "sub", {"3": 3, "7": 7})
    assert main(["eval", str(trained), "--data", f"folder:{tmp_path / 'sub'}", "--out", str(tmp_path / "o1"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    conf = np.asarray(res["confusion"])
    assert conf.shape == (10, 10) and res["num_images"] == 30 and set(res["per_class"]) == {"3", "7"}
    assert conf[3].sum() == 15 and conf[7].sum() == 15 and conf.sum() == 30  # rows by the checkpoint's index
    preds = vitkit.tasks.classify.predict(trained, files["3"] + files["7"], topk=1)
    right = sum(p["label"] == ("3" if i < 15 else "7") for i, p in enumerate(preds))
    assert res["top1"] == pytest.approx(100 * right / 30, abs=1e-3)  # the same answers as predict gives

    # the same images under other names: refused with the names listed, then scored the same through a map
    _digit_folder(tmp_path / "named", {"seven": 7, "three": 3})
    spec = f"folder:{tmp_path / 'named'}"
    assert main(["eval", str(trained), "--data", spec, "--out", str(tmp_path / "o2")]) == 2
    err = _err(capsys)
    assert "'seven', 'three'" in err and "--class-map" in err
    (tmp_path / "map.json").write_text(json.dumps({"seven": "7", "three": "3"}))
    for mapping in ("three=3,seven=7", str(tmp_path / "map.json")):
        assert main(["eval", str(trained), "--data", spec, "--class-map", mapping, "--out", str(tmp_path / "o3"),
                     "--json"]) == 0
        mapped = json.loads(capsys.readouterr().out)
        assert mapped["top1"] == res["top1"] and mapped["confusion"] == res["confusion"]
        assert mapped["data_classes"] == {"seven": "7", "three": "3"}
    assert main(["eval", str(trained), "--data", spec, "--class-map", "three=3,eight=8"]) == 2
    assert "'eight'" in _err(capsys)

    # one class the checkpoint does not know among known ones; ten classes of ten other names
    _digit_folder(tmp_path / "sub", {"cat": 1}, n_val=2)
    assert main(["eval", str(trained), "--data", f"folder:{tmp_path / 'sub'}"]) == 2
    assert "1 class(es) the checkpoint does not know: 'cat';" in _err(capsys)
    _digit_folder(tmp_path / "ten", {f"d{i}": i for i in range(10)}, n_val=1)
    assert main(["eval", str(trained), "--data", f"folder:{tmp_path / 'ten'}", "--out", str(tmp_path / "o4")]) == 2
    assert "10 class(es) the checkpoint does not know: 'd0', 'd1'" in _err(capsys)


def test_match_classes_and_class_maps():
    from vitkit.tasks.classify import match_classes, parse_class_map

    names = ["cat", "dog", "fox"]
    assert match_classes(["fox", "cat"], names) == [2, 0]
    assert match_classes(["a", "b"], names, class_map={"a": "dog", "b": "dog"}) == [1, 1]
    with pytest.raises(vitkit.DataError, match=r"2 class\(es\) the checkpoint does not know: 'a', 'b=cow'"):
        match_classes(["a", "b", "cat"], names, class_map={"b": "cow"})
    with pytest.raises(vitkit.ConfigError, match="class_map names classes that .* does not have: 'z'") as e:
        match_classes(["cat"], names, class_map={"z": "cat"})
    assert e.value.field == "class_map"
    assert match_classes(["x", "y", "z"], ["0", "1", "2"], named=False) == [0, 1, 2]  # no names: by position
    with pytest.raises(vitkit.CheckpointError, match="no names recorded"):
        match_classes(["x", "y"], ["0", "1", "2"], named=False)
    assert parse_class_map("a=cat, b = dog") == {"a": "cat", "b": "dog"}
    for bad in ("a", "a=", "=b", ","):
        with pytest.raises(vitkit.ConfigError, match="class_map"):
            parse_class_map(bad)


@pytest.mark.parametrize("argv,said", [
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1.0"),
    (["--mixup", "-0.5"], "--mixup must be >= 0"), (["--cutmix", "nan"], "--cutmix must be a number"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--accum-steps", "0"], "--accum-steps must be >= 1"), (["--epochs", "0"], "--epochs must be >= 1"),
    (["--name", ""], "argument --name: expected a plain folder name"),
    (["--name", "a/b"], "argument --name: expected a plain folder name"),
    (["--val-split", "0.2"], "--val-split applies to folder:PATH data only; mnist5k has a fixed held-out split"),
    (["--val-split", "0.1"], "--val-split applies to folder:PATH data only"),
    (["--lr", "banana"], "argument --lr: invalid float value: 'banana'"), (["--lr", "0"], "--lr must be > 0"),
    (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
    (["--ema", "1"], "--ema must be in [0, 1)"), (["--layer-decay", "2"], "--layer-decay must be in (0, 1]"),
    (["--progressive", "0"], "--progressive must be in (0, 1]"), (["--drop-path", "-1"], "--drop-path must be"),
    (["--device", "banana"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--seed", "-1"], "--seed must be between 0 and"), (["--max-train", "0"], "--max-train must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"), (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (["--time-budget", "-5"], "--time-budget must be > 0"), (["--workers", "-2"], "--workers must be >= 0"),
    (["--eval-every", "0"], "--eval-every must be >= 1")])
def test_train_options_are_one_line_errors_naming_the_flag(argv, said, tmp_path, capsys):
    """Each train option class (ranges, whole numbers, choices, names, data-dependent flags) is refused where it
    is parsed, before any data or run folder, with one line naming the flag."""
    assert main(["train", "--runs-dir", str(tmp_path), "--epochs", "1", *argv]) == 2
    assert said in _err(capsys)
    assert not any(tmp_path.iterdir())


def test_predict_and_eval_options_name_the_flag(trained, tmp_path, capsys):
    img = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    for argv, said in [(["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                       (["--topk", "0"], "--topk must be >= 1, got 0"), (["--tome", "-1"], "--tome must be >= 0"),
                       (["--device", "gpu"], "--device must be auto, cpu"),
                       (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'")]:
        assert main(["predict", str(trained), str(img), *argv]) == 2
        assert said in _err(capsys)
    for argv, said in [(["--batch-size", "0"], "--batch-size must be >= 1"),
                       (["--val-split", "0.3"], "--val-split applies to folder:PATH data only"),
                       (["--max-val", "0"], "--max-val must be >= 1")]:
        assert main(["eval", str(trained), "--data", "mnist5k", "--out", str(tmp_path), *argv]) == 2
        assert said in _err(capsys)


def test_a_wrong_init_format_hint_names_trains_own_flag(tmp_path, capsys):
    """train's format flag is --init-format (export's is --from): the hint names it."""
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2)
    torch.save(model.state_dict(), tmp_path / "timm.pth")  # timm's layout
    assert main(["train", "--init", str(tmp_path / "timm.pth"), "--init-format", "hf", "--epochs", "1",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    err = _err(capsys)
    assert "timm layout" in err and "--init-format" in err


@pytest.mark.parametrize("argv,said", [
    (["summary", "vit_mini_patch7_28", "--img-size", "0"], "--img-size must be >= 1, got 0"),
    (["summary", "vit_mini_patch7_28", "--num-classes", "-3"], "--num-classes must be >= 0"),
    (["eval-retrieval", "CKPT", "--data", "mnist5k", "--knn-k", "0"], "--knn-k must be >= 1"),
    (["eval-retrieval", "CKPT", "--data", "mnist5k", "--temperature", "0"], "--temperature must be > 0"),
    (["train-gen", "--class-dropout", "2", "--runs-dir", "RUNS"], "--class-dropout must be in [0, 1)"),
    (["train-gen", "--sample-steps", "0", "--runs-dir", "RUNS"], "--sample-steps must be >= 1"),
    (["pretrain", "--mask-ratio", "1.5", "--runs-dir", "RUNS"], "--mask-ratio must be in [0, 1)"),
    (["pretrain", "--model-arg", "embed_dim=x", "--runs-dir", "RUNS"], "--model-arg embed_dim must be a whole"),
    (["generate", "CKPT", "-n", "0"], "-n must be >= 1"), (["generate", "CKPT", "--steps", "0"], "--steps must be"),
    (["reconstruct", "CKPT", "IMG", "--mask-ratio", "2"], "--mask-ratio must be in [0, 1)"),
    (["index", "build", "CKPT", "--out", "RUNS", "--M", "1"], "--M must be >= 2")])
def test_other_commands_name_the_flag(argv, said, tmp_path, capsys):
    """The same one-line, flag-naming errors from the other commands, before any file is read."""
    subs = {"CKPT": str(tmp_path / "none.safetensors"), "IMG": str(tmp_path / "none.png"), "RUNS": str(tmp_path / "r")}
    assert main([subs.get(a, a) for a in argv]) == 2
    assert said in _err(capsys)
    assert not (tmp_path / "r").exists()
