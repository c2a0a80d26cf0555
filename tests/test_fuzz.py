"""Fuzzing the command line, in-process: random flag values for train / predict / embed / search / export, and
random bytes, truncations and mutated headers for images, checkpoints and indexes. Every run must end in exit 0
with a sound result, or exit 2 with one `vitkit: error:` line (predict: 1 with a per-image error row) — never a
traceback, never a hang. Seeded (VITKIT_FUZZ_SEED picks another draw of flags when exploring), and small enough for
a few tens of seconds; each run's argv goes to the real stderr, so a hang names its command."""
import json
import os
import random
import shutil
import struct
import sys

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

INTS = ["-1", "0", "1", "2", "3", "banana", "", "2.5", "99999999999999999999"]
SMALL_INTS = ["-1", "0", "1", "2", "4", "7", "14", "banana", "2.5", ""]  # sizes: never a model of terabytes
FLOATS = ["-1", "0", "0.5", "1", "2", "nan", "inf", "1e308", "banana", "", "1e-9"]
NAMES = ["", "banana", "a/b", "..", ".", "run-ü", "x" * 300]
DEVICES = ["cpu", "auto", "banana", "cuda", "cuda:7", "mps", "", "cpu:0"]
CLASSES = ["a", "b", "c"]


def _digit(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return (rng.random((28, 28)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class 1-block ViT on 28x28 grey images, a 3x4-image gallery, its embeddings and a flat index, and a few
    files that are no image, no checkpoint, no index."""
    root = tmp_path_factory.mktemp("fuzz")
    model = vitkit.create_model("vit_mini_patch7_28", embed_dim=16, depth=1, num_heads=2, num_classes=3)
    ckpt = root / "m.safetensors"
    vitkit.save(model, ckpt, class_names=CLASSES)
    for c, name in enumerate(CLASSES):
        (root / "g" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(_digit(10 * c + i)).save(root / "g" / name / f"{i}.png")
    (root / "empty").mkdir()
    (root / "junk.bin").write_bytes(bytes(range(256)) * 4)
    Image.fromarray(_digit(99)).save(root / "q.png")
    Image.fromarray(np.stack([_digit(98)] * 3, -1)).save(root / "q.jpg", quality=90)
    assert main(["embed", str(ckpt), str(root / "g"), "--out", str(root / "e.safetensors"), "--quiet"]) == 0
    assert main(["index", "build", str(root / "e.safetensors"), "--out", str(root / "ix")]) == 0
    return root


_SEEN: dict = {}


class Outcome:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err


def _run(capsys, argv) -> Outcome:
    """main(argv) in-process; the run must return 0, 1 (predict: an image failed) or 2 with a one-line error."""
    capsys.readouterr()
    print("fuzz:", argv, file=sys.__stderr__, flush=True)  # the last one names a hang
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert rc in (0, 1, 2), (argv, rc, err)
    errors = [line for line in err.splitlines() if line.startswith("vitkit: error:")]
    if rc == 2:
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (argv, err)
        assert len(errors[0]) > len("vitkit: error: ") + 5, (argv, err)
    else:
        assert not errors, (argv, err)
    _SEEN[(str(argv[0]), rc)] = _SEEN.get((str(argv[0]), rc), 0) + 1
    if rc == 1:
        assert argv[0] == "predict" and ("ERROR" in out or '"error"' in out), (argv, out, err)
    return Outcome(rc, out, err)


def _pick(rng, pools: dict, n_max: int = 3) -> list:
    """1..n_max random flags of `pools` (flag → list of values; None → a flag without a value)."""
    argv = []
    for flag in rng.sample(sorted(pools), rng.randint(1, min(n_max, len(pools)))):
        value = rng.choice(pools[flag])
        argv += [flag] if value is None else [flag, value]
    return argv


def _check_predict(res, argv, names=CLASSES):
    rows = json.loads(res.out)
    for r in rows:
        assert "error" in r or (r["label"] in names and 1 <= len(r["topk"]) <= 3), (argv, r)
        if "error" not in r:
            probs = [t["prob"] for t in r["topk"]]
            assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs), (argv, r)


def test_random_flag_values(world, capsys, tmp_path):
    rng = random.Random(int(os.environ.get("VITKIT_FUZZ_SEED", "0")))
    ckpt, gallery = world / "m.safetensors", world / "g"
    predict_pools = {"--topk": INTS, "--batch-size": INTS, "--device": DEVICES, "--tome": SMALL_INTS,
                     "--strict": [None]}
    train_pools = {
        "--data": ["mnist5k", "digits", f"folder:{gallery}", f"folder:{world / 'nope'}", "banana", "folder:"],
        "--model": ["vit_mini_patch7_28", "nope"], "--model-arg": [
            "drop_path_rate=banana", "embed_dim=-8", "qk_norm=true", "global_pool=avg", "nope=1", "noequals",
            "depth=2.5", "mlp_ratio=0", "init_values=1e-5", "reg_tokens=2", "class_token=false", "depth=[1]",
            "drop_path_rate=NaN", "patch_drop_rate=0.5", "stem=conv", "img_size=[28,35]", "=3"],
        "--img-size": SMALL_INTS, "--patch-size": SMALL_INTS, "--num-heads": SMALL_INTS, "--stem": ["conv", "x"],
        "--epochs": INTS, "--max-steps": INTS, "--batch-size": INTS, "--accum-steps": SMALL_INTS, "--lr": FLOATS,
        "--min-lr": FLOATS, "--weight-decay": FLOATS, "--warmup": FLOATS, "--clip-grad": FLOATS,
        "--label-smoothing": FLOATS, "--mixup": FLOATS, "--cutmix": FLOATS, "--ema": FLOATS, "--drop-path": FLOATS,
        "--patch-drop": FLOATS, "--progressive": FLOATS, "--layer-decay": FLOATS, "--val-split": FLOATS,
        "--max-train": INTS, "--max-val": INTS, "--seed": INTS, "--eval-every": INTS, "--workers": SMALL_INTS,
        "--device": DEVICES, "--name": NAMES, "--precision": ["fp32", "bf16", "auto", "fp64"],
        "--augment": ["none", "strong", "extreme"], "--time-budget": ["1s", "0", "none", "banana", "-5", "3"],
        "--init": [str(ckpt), str(world / "junk.bin"), str(world / "nope.pth"), str(world / "empty")],
        "--init-format": ["timm", "hf", "npz", "torchvision", "vitkit", "x"],
        "--recipe": [str(world / "junk.bin"), str(world / "nope"), str(world)], "--hflip": [None],
        "--tta": [None], "--aug-ramp": [None]}
    embed_pools = {"--pool": ["cls", "mean", "prelogits", "x"], "--layer": ["-3", "-2", "-1", "0", "1", "5", "x"],
                   "--batch-size": INTS, "--strict": [None], "--overwrite": [None]}
    search_pools = {"--k": INTS, "--nprobe": INTS, "--ef-search": INTS,
                    "--checkpoint": [str(ckpt), str(world / "junk.bin"), str(world / "nope")],
                    "--grid": ["", str(world / "empty"), str(tmp_path / "grids" / "x.png")]}
    export_pools = {"--format": ["vitkit", "timm", "hf", "npz", "banana"],
                    "--from": ["vitkit", "timm", "hf", "npz", "torchvision", "x"], "--num-heads": SMALL_INTS,
                    "--img-size": SMALL_INTS, "--patch-size": SMALL_INTS, "--num-classes": SMALL_INTS,
                    "--model": ["vit_mini_patch7_28", "nope"], "--no-verify": [None], "--overwrite": [None]}
    counts = {}
    for trial in range(220):
        cmd = rng.choice(["predict", "predict", "train", "train", "embed", "search", "export"])
        if cmd == "predict":
            images = rng.choice([[world / "q.png"], [gallery], [world / "q.jpg", world / "junk.bin"],
                                 [world / "nope.png"], [world / "empty"]])
            argv = ["predict", rng.choice([ckpt, ckpt, world / "junk.bin", world / "nope"]), *images, "--json",
                    *_pick(rng, predict_pools)]
            res = _run(capsys, argv)
            if res.rc in (0, 1):
                _check_predict(res, argv)
        elif cmd == "train":
            run = tmp_path / f"runs{trial}"
            argv = ["train", "--model", "vit_mini_patch7_28", "--model-arg", "embed_dim=16", "--model-arg", "depth=1",
                    "--model-arg", "num_heads=2", "--epochs", "1", "--max-steps", "1", "--batch-size", "8",
                    "--max-train", "40", "--max-val", "20", "--runs-dir", run, "--quiet", "--json",
                    *_pick(rng, train_pools, 2)]
            res = _run(capsys, argv)
            if res.rc == 0:
                summary = json.loads(res.out)
                assert (run / summary["run_dir"].split("/")[-1] / "best.safetensors").is_file(), argv
        elif cmd == "embed":
            out = tmp_path / f"e{trial}.safetensors"
            folder = rng.choice([gallery, gallery, world / "empty", world / "nope", world / "q.png"])
            argv = ["embed", ckpt, folder, "--out", rng.choice([out, out, world / "junk.bin", world / "g"]), "--quiet",
                    *_pick(rng, embed_pools)]
            res = _run(capsys, argv)
            if res.rc == 0:
                assert json.loads(res.out)["images"] == (12 if folder == gallery else 1), argv
        elif cmd == "search":
            q = rng.choice([world / "q.png", world / "q.jpg", world / "junk.bin", world / "nope.png"])
            argv = ["search", rng.choice([world / "ix", world / "ix", world / "g", world / "nope"]), q,
                    "--grid", "", *_pick(rng, search_pools)]
            res = _run(capsys, argv)
            if res.rc == 0:
                doc = json.loads(res.out)
                n = len(doc["results"][0]["neighbours"])
                assert 1 <= n <= min(12, doc["k"]), argv
        else:
            out = tmp_path / f"x{trial}"
            argv = ["export", rng.choice([ckpt, ckpt, world / "junk.bin", world / "nope"]), "--out", out,
                    *_pick(rng, export_pools)]
            if "--format" not in argv:
                argv += ["--format", "vitkit"]
            res = _run(capsys, argv)
            if res.rc == 0:
                assert out.exists() or any(tmp_path.glob(f"x{trial}*")), argv
        counts[(cmd, res.rc)] = counts.get((cmd, res.rc), 0) + 1
    # the fuzz reached both sides of every command: successful runs and refused ones
    for cmd in ("predict", "train", "embed", "search", "export"):
        assert counts.get((cmd, 2), 0) > 0 and counts.get((cmd, 0), 0) + counts.get((cmd, 1), 0) > 0, counts


def _mutations(data: bytes, rng: random.Random, n: int, head: int = 64) -> list:
    """Random bytes, truncations, and copies with a few bytes of the first `head` changed."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))))
        elif kind == 1:
            out.append(data[:rng.randrange(len(data))])
        else:
            b = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                b[rng.randrange(min(head, len(b)))] = rng.randrange(256)
            out.append(bytes(b))
    return out


def test_damaged_images(world, capsys, tmp_path):
    rng = random.Random(1)
    sources = [(world / "q.png").read_bytes(), (world / "q.jpg").read_bytes()]
    folder = tmp_path / "bad" / "x"
    folder.mkdir(parents=True)
    files = []
    for j, data in enumerate(sources):
        for i, b in enumerate(_mutations(data, rng, 24)):
            files.append(folder / f"{j}_{i}.{'png' if j == 0 else 'jpg'}")
            files[-1].write_bytes(b)
    ckpt = world / "m.safetensors"
    res = _run(capsys, ["predict", ckpt, *files, "--json"])
    _check_predict(res, "predict")
    assert len(json.loads(res.out)) == len(files)
    for f in rng.sample(files, 8):
        _run(capsys, ["predict", ckpt, f, "--strict", "--json"])
        _run(capsys, ["search", world / "ix", f, "--grid", ""])
    shutil.copytree(world / "g" / "a", tmp_path / "bad" / "a")
    res = _run(capsys, ["embed", ckpt, tmp_path / "bad", "--out", tmp_path / "e.safetensors", "--quiet"])
    assert res.rc == 0 and json.loads(res.out)["embedded"] >= 4
    assert _run(capsys, ["embed", ckpt, tmp_path / "bad", "--out", tmp_path / "s.safetensors", "--quiet",
                         "--strict"]).rc in (0, 2)


def test_damaged_checkpoints(world, capsys, tmp_path):
    """Truncated files, and flipped bytes in the header (its length and its JSON), of a vitkit checkpoint."""
    rng = random.Random(2)
    data = (world / "m.safetensors").read_bytes()
    head = 8 + struct.unpack("<Q", data[:8])[0]
    for i, b in enumerate(_mutations(data, rng, 36, head=head)):
        path = tmp_path / f"c{i}.safetensors"
        path.write_bytes(b)
        res = _run(capsys, ["predict", path, world / "q.png", "--json"])
        if res.rc in (0, 1):
            _check_predict(res, "predict")
        _run(capsys, ["export", path, "--format", "vitkit", "--out", tmp_path / f"o{i}.safetensors"])


def test_damaged_pickled_checkpoints(world, capsys, tmp_path):
    """Random bytes, truncations and flipped bytes of a PyTorch state dict, zip and legacy pickle formats: torch's
    weights-only unpickler fails in many ways on them (KeyError, IndexError, ...); each must be one line."""
    import torch

    state = vitkit.load(world / "m.safetensors").state_dict()
    rng = random.Random(3)
    for legacy in (False, True):
        src = tmp_path / f"src{int(legacy)}.pth"
        torch.save(state, src, _use_new_zipfile_serialization=not legacy)
        data = src.read_bytes()
        for i, b in enumerate(_mutations(data, rng, 30, head=len(data) if legacy else 64)):
            path = tmp_path / f"p{int(legacy)}_{i}.pth"
            path.write_bytes(b)
            res = _run(capsys, ["export", path, "--format", "vitkit", "--num-heads", "2",
                                "--out", tmp_path / f"po{int(legacy)}_{i}.safetensors"])
            assert res.rc in (0, 2), res


def _edited_checkpoints(path, out_dir):
    """Well-formed safetensors files whose vitkit metadata or tensors say something wrong (small values only: a
    wrong config must not build a model of gigabytes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cfg, pcfg = json.loads(meta["config"]), json.loads(meta["pretrained_cfg"])
    edits = [("config", k, v) for k, v in [
        ("embed_dim", 8), ("embed_dim", -1), ("embed_dim", "x"), ("depth", 0), ("depth", 2), ("num_heads", 3),
        ("num_heads", 0), ("img_size", 14), ("img_size", 0), ("img_size", [28, 35]), ("patch_size", 4),
        ("patch_size", 0), ("in_chans", 3), ("in_chans", 0), ("num_classes", 5), ("num_classes", 0),
        ("num_classes", -1), ("global_pool", "x"), ("global_pool", "avg"), ("stem", "conv"), ("mlp_ratio", 0),
        ("class_token", False), ("reg_tokens", 1), ("norm_eps", "x"), ("bogus", 1)]]
    edits += [("pretrained_cfg", k, v) for k, v in [
        ("class_names", ["a"]), ("class_names", "abc"), ("class_names", [1, 2, 3]), ("mean", []), ("mean", ["x"]),
        ("std", [0]), ("std", [0, 0, 0, 0]), ("input_size", [1, 2]), ("input_size", "x"), ("crop_pct", 0),
        ("crop_pct", "x"), ("crop_pct", -1), ("interpolation", "x"), ("tta_flip", "yes")]]
    files = []
    for i, (part, k, v) in enumerate(edits):
        m = dict(meta)
        d = dict(cfg if part == "config" else pcfg)
        d[k] = v
        m[part] = json.dumps(d)
        files.append(out_dir / f"edit{i}.safetensors")
        save_file(tensors, str(files[-1]), metadata=m)
    for i, m in enumerate([{**meta, "config": "not json"}, {**meta, "config": "[]"}, {**meta, "pretrained_cfg": "x"},
                           {**meta, "model_type": "x"}, {**meta, "model_type": "mae"}, {**meta, "version": "99"},
                           {k: v for k, v in meta.items() if k != "config"}]):
        files.append(out_dir / f"meta{i}.safetensors")
        save_file(tensors, str(files[-1]), metadata=m)
    name = sorted(tensors)[0]
    for i, t in enumerate([{k: v for k, v in tensors.items() if k != name}, {**tensors, "extra": tensors[name].clone()},
                           {**tensors, name: tensors[name].flatten()[:1].clone()},
                           {**tensors, name: tensors[name].half()}, {**tensors, name: tensors[name] * float("nan")}]):
        files.append(out_dir / f"tensors{i}.safetensors")
        save_file(t, str(files[-1]), metadata=meta)
    return files


def test_checkpoints_with_wrong_metadata(world, capsys, tmp_path):
    for path in _edited_checkpoints(world / "m.safetensors", tmp_path):
        res = _run(capsys, ["predict", path, world / "q.png", world / "q.jpg", "--json"])
        if res.rc in (0, 1):
            _check_predict(res, path, CLASSES + ["1", "2", "3"])  # the edit that names the classes 1, 2, 3
        _run(capsys, ["export", path, "--format", "vitkit", "--out", tmp_path / f"{path.stem}.out.safetensors"])
        _run(capsys, ["embed", path, world / "g", "--out", tmp_path / f"{path.stem}.emb.safetensors", "--quiet"])


def test_damaged_indexes_and_embeddings(world, capsys, tmp_path):
    rng = random.Random(3)
    manifest = (world / "ix" / "manifest.json").read_bytes()
    faiss_file = (world / "ix" / "index.faiss").read_bytes()
    doc = json.loads(manifest)
    edits = [("dim", 7), ("dim", -1), ("dim", "x"), ("kind", "hnsw"), ("kind", "x"), ("count", 99), ("paths", None),
             ("params", {}), ("params", {"nprobe": 0, "M": 32, "ef_search": 64, "ef_construction": 80}),
             ("model", "x"), ("labels", [1]), ("format", "other")]
    cases = [(m, faiss_file) for m in _mutations(manifest, rng, 12, head=len(manifest))]
    cases += [(json.dumps({**doc, k: v}).encode(), faiss_file) for k, v in edits]
    cases += [(json.dumps([doc]).encode(), faiss_file)]
    cases += [(manifest, f) for f in _mutations(faiss_file, rng, 18, head=len(faiss_file))]
    for i, (m, f) in enumerate(cases):
        ix = tmp_path / f"ix{i}"
        ix.mkdir()
        (ix / "manifest.json").write_bytes(m)
        (ix / "index.faiss").write_bytes(f)
        res = _run(capsys, ["search", ix, world / "q.png", "--grid", "", "--k", "3"])
        if res.rc == 0:
            assert 1 <= len(json.loads(res.out)["results"][0]["neighbours"]) <= 3
    emb = (world / "e.safetensors").read_bytes()
    for i, b in enumerate(_mutations(emb, rng, 12, head=8 + struct.unpack("<Q", emb[:8])[0])):
        path = tmp_path / f"e{i}.safetensors"
        path.write_bytes(b)
        _run(capsys, ["index", "build", path, "--out", tmp_path / f"b{i}"])

