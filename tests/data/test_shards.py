"""WebDataset shards: `vitkit shards` writes what it read (same samples, same labels), `--data wds:` streams it split
by process and worker with every sample once per epoch, resumes mid-epoch with the same batches, leaves bad samples
out and counts them, and refuses an `_info.json` that does not describe its shards in one line."""
import collections
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")

from vitkit.cli import main  # noqa: E402
from vitkit.data import build_datasets, make_loader, open_data  # noqa: E402
from vitkit.data import shards as S  # noqa: E402
from vitkit.errors import DataError  # noqa: E402


def _folder(root: Path, per_class: int = 10) -> Path:
    """Four classes of small random images, JPEG and PNG mixed, 12 px wide and 12-14 px high."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 255, (12 + i % 3, 12, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder (40 images) and its shards: 32 training samples, 4 per shard (8 shards), 8 held out."""
    tmp = tmp_path_factory.mktemp("shards")
    folder = _folder(tmp / "imgs")
    S.write_shards(f"folder:{folder}", tmp / "wds", max_count=4, val_split=0.2, progress=False)
    return folder, tmp / "wds"


def _samples(split_urls):
    """Every raw sample of the given shards, in order."""
    return [s for u in split_urls for s in S._ShardReader(u)]


def test_round_trip_folder_to_shards_keeps_samples_and_labels(shards):
    folder, out = shards
    info = json.loads((out / "_info.json").read_text())
    classes = info["class_names"]
    assert classes == ["ant", "bee", "cat", "dog"]
    files = {str(p.relative_to(folder)): (p.read_bytes(), classes.index(p.parent.name))
             for p in folder.rglob("*") if p.is_file()}
    seen = {}
    for name in ("train", "validation"):
        sp = info["splits"][name]
        assert sp["num_samples"] == sum(sp["shard_lengths"]) and len(sp["sha256"]) == len(sp["filenames"])
        for s in _samples([str(out / f) for f in sp["filenames"]]):
            src = json.loads(s["json"])["filename"]
            seen[src] = (s.get("jpg", s.get("png")), int(s["cls"]))
            assert (("jpg" in s) == src.endswith(".jpg")) and s["__key__"].isdigit() and len(s["__key__"]) == 6
    assert seen == files  # every file once, byte for byte, with its label
    assert info["splits"]["train"]["shard_lengths"] == [4] * 8 and info["splits"]["validation"]["num_samples"] == 8
    stats = info["image_stats"]
    assert stats["sizes"]["width"]["median"] == 12 and stats["sizes"]["height"]["max"] == 14
    assert len(stats["mean"]) == 3 and all(0 < v < 1 for v in stats["std"])
    # the planner's profile comes from _info.json, and the decoded pixels are the folder path's
    src = open_data(f"wds:{out}")
    prof = src.profile()
    assert prof.num_train == 32 and src.num_val == 8 and prof.native_size[1] == 12 and 12 <= prof.native_size[0] <= 14
    _, val, _ = build_datasets(src, img_size=12, augment="none", mean=[0, 0, 0], std=[1, 1, 1])
    x = torch.cat([x for x, _ in make_loader(val, 3, train=False)])
    assert len(x) == 8
    from vitkit.data.folders import square_resize
    from vitkit.data.images import read_image

    names = [json.loads(s["json"])["filename"] for s in _samples(val.split.urls)]
    want = torch.stack([torch.from_numpy(square_resize(read_image(folder / n, 3, draft_size=12), 12)) for n in names])
    assert torch.equal((x * 255).round().to(torch.uint8), want)


def test_built_in_set_round_trips_pixels_and_labels(tmp_path):
    pytest.importorskip("sklearn")
    S.write_shards("digits", tmp_path / "d", shard_size="64KB", progress=False)
    src = open_data(f"wds:{tmp_path / 'd'}")
    ref = open_data("digits")
    got = _samples(src.shards.val.urls)
    from PIL import Image

    pix = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(s["png"])))) for s in got])
    assert torch.equal(pix, ref.val.images[:, 0]) and [int(s["cls"]) for s in got] == ref.val.labels.tolist()
    assert src.num_train == ref.num_train and len(src.shards.train) > 1


def _identity(x: torch.Tensor):
    """A hashable identity of each decoded image in a batch."""
    return [hashlib.sha1((img * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest() for img in x]


def _ds(out, split="train", side=12, aug=False):
    src = open_data(f"wds:{out}")
    train, val, _ = build_datasets(src, img_size=side, augment="default" if aug else "none", mean=[0, 0, 0],
                                   std=[1, 1, 1])
    return train if split == "train" else val


def test_split_by_rank_and_worker_covers_every_sample_once_per_epoch(shards):
    _, out = shards
    everything = _identity(torch.cat([x for x, _ in make_loader(_ds(out), 8, train=False)]))
    assert len(set(everything)) == 32
    orders = []
    for epoch in (0, 1):
        got, labels = [], collections.Counter()
        for rank in (0, 1):  # 2 processes × 2 DataLoader workers: 8 shards, one pass each
            ld = make_loader(_ds(out), 8, train=True, seed=3, epoch=epoch, rank=rank, world=2, workers=2)
            assert len(ld) == 4 and not ld.resampled
            batches = list(ld)
            assert len(batches) == 4 and all(len(y) == 4 for _, y in batches)
            for x, y in batches:
                got += _identity(x)
                labels.update(y.tolist())
        assert sorted(got) == sorted(everything)  # every sample exactly once over the processes
        orders.append(got)
    assert orders[0] != orders[1]  # a new shuffle each epoch...
    again = [i for r in (0, 1) for x, _ in make_loader(_ds(out), 8, train=True, seed=3, epoch=1, rank=r, world=2,
                                                          workers=2) for i in _identity(x)]
    assert again == orders[1]  # ...that the seed and epoch decide
    # fewer shards than processes × workers: shards drawn with replacement, the epoch still has its steps
    ld = make_loader(_ds(out), 8, train=True, seed=3, epoch=0, rank=1, world=8, workers=2)
    assert ld.resampled and len(ld) == 4 and [len(y) for _, y in ld] == [1] * 4


def test_the_global_batches_are_the_same_in_any_number_of_processes_and_workers(shards):
    """With the run's streams fixed (4), every step's global batch, augmentation included, is the same whether 1, 2 or
    4 processes read them, with or without DataLoader workers, resumed mid-epoch or not."""
    from vitkit.errors import ConfigError

    ds = _ds(shards[1], aug=True)

    def steps(world, workers, start=0, streams=4, bs=8):
        per_rank = [list(make_loader(ds, bs, train=True, seed=5, epoch=1, rank=r, world=world,
                                     workers=workers, streams=streams, start_batch=start)) for r in range(world)]
        assert all(len(b) == 4 - start for b in per_rank)
        return [collections.Counter(i for b in per_rank for i in _identity(b[j][0])) for j in range(4 - start)]

    one = steps(1, 0)
    assert all(sum(c.values()) == 8 for c in one) and len(set().union(*one)) == 32  # 4 steps of 8: each sample once
    for world, workers in ((1, 2), (2, 1), (4, 0)):
        assert steps(world, workers) == one, (world, workers)
    assert steps(2, 0, start=2) == one[2:]
    assert steps(1, 0, streams=2) != one  # ... which the streams decide
    with pytest.raises(ConfigError, match="4 shard streams do not divide over 3 processes"):
        make_loader(ds, 9, train=True, rank=0, world=3, streams=4)


def test_mid_epoch_resume_yields_the_same_batches(shards):
    _, out = shards
    for world, rank, workers in ((1, 0, 2), (2, 1, 0)):
        ds = _ds(out, aug=True)
        kw = dict(train=True, seed=1, epoch=2, rank=rank, world=world, workers=workers)
        full = list(make_loader(ds, 4, **kw))
        assert len(full) == 8
        for start in (3, 6):
            rest = list(make_loader(ds, 4, start_batch=start, **kw))
            assert len(rest) == len(full) - start
            for (a, ya), (b, yb) in zip(full[start:], rest):
                assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("kind", ["shards", "memory"])
def test_training_resumed_mid_epoch_ends_with_the_same_weights(shards, tmp_path, kind):
    from _runs import Interrupt

    from vitkit import create_model
    from vitkit.data import AugmentConfig, BatchTransform, InMemoryDataset
    from vitkit.tasks.classify import classification_loss
    from vitkit.train import Trainer, TrainConfig

    _, out = shards

    def data():
        if kind == "shards":
            return _ds(out, aug=True)
        g = torch.Generator().manual_seed(0)
        ds = InMemoryDataset(torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8, generator=g),
                             torch.arange(32) % 4)
        ds.transform = BatchTransform(12, [0.5] * 3, [0.25] * 3, AugmentConfig(translate=0.1, hflip=True))
        return ds

    def trainer(name, **kw):
        torch.manual_seed(0)
        model = create_model(img_size=12, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=4)
        cfg = TrainConfig(name=name, runs_dir=str(tmp_path), epochs=2, batch_size=4, lr=1e-2, quiet=True,
                          save_every=3, workers=1 if kind == "shards" else 0, **kw)
        return Trainer(model, data(), cfg, classification_loss(0.1))

    whole = trainer("whole")
    whole.fit()
    cut = trainer("cut")
    real = cut._loader

    class Interrupted:  # the epoch's loader, cut 3 batches into epoch 2 (step 11; the last checkpoint: step 9)
        def __init__(self, epoch, start_batch=0):
            self.epoch, self.loader = epoch, real(epoch, start_batch)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for i, b in enumerate(self.loader):
                if self.epoch == 1 and i == 3:
                    raise Interrupt
                yield b

    cut._loader = Interrupted
    with pytest.raises(Interrupt):
        cut.fit()
    state = torch.load(tmp_path / "cut" / "last.state.pt", weights_only=True)
    assert state["step"] == 9 and state["data_pos"]["epoch"] == 1 and state["data_pos"]["batch"] == 1
    resumed = trainer("cut", resume=str(tmp_path / "cut"))
    resumed.fit()
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.step == whole.step == 16


def _rewrite_shard(out: Path, name: str, edit) -> None:
    """Rewrite one shard through `edit(samples) -> samples` and update _info.json to match it."""
    import webdataset as wds

    path = out / name
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in S._ShardReader(str(path))]
    samples = edit(samples)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    info = json.loads((out / "_info.json").read_text())
    sp = info["splits"]["train"]
    i = sp["filenames"].index(name)
    sp["num_samples"] += len(samples) - sp["shard_lengths"][i]
    sp["shard_lengths"][i] = len(samples)
    sp["sha256"][i] = hashlib.sha256(path.read_bytes()).hexdigest()
    sp["bytes"][i] = path.stat().st_size
    (out / "_info.json").write_text(json.dumps(info))


def test_bad_samples_are_left_out_and_counted(shards, tmp_path, caplog):
    import shutil

    out = tmp_path / "wds"
    shutil.copytree(shards[1], out)

    def damage(samples):
        samples[1]["png" if "png" in samples[1] else "jpg"] = b"not an image"
        del samples[2]["cls"]
        return samples

    _rewrite_shard(out, "train-000003.tar", damage)
    ds = _ds(out)
    sizes = [len(y) for _, y in make_loader(ds, 8, train=True, seed=0, epoch=0)]
    assert sum(sizes) == 30 and len(sizes) == 4 and ds.skipped == 2  # 32 read, two left out
    assert any("train-000003.tar" in k for k in ds.skipped_keys)
    assert "left out 2 bad sample(s)" in caplog.text


def test_info_that_does_not_match_the_shards_is_a_one_line_error(shards, tmp_path, capsys, monkeypatch):
    import shutil

    def copy(name):
        shutil.copytree(shards[1], tmp_path / name)
        return tmp_path / name

    def info_edit(d, fn):
        info = json.loads((d / "_info.json").read_text())
        fn(info)
        (d / "_info.json").write_text(json.dumps(info))

    d = copy("lengths")  # lengths that still add up, but not the shards'
    info_edit(d, lambda i: i["splits"]["train"]["shard_lengths"].__setitem__(slice(0, 2), [3, 5]))
    with pytest.raises(DataError, match="holds 4 samples but .* says 3"):
        open_data(f"wds:{d}")
    d = copy("count")
    info_edit(d, lambda i: i["splits"]["train"].update(num_samples=33))
    with pytest.raises(DataError, match="num_samples 33 but its shard_lengths add up to 32"):
        open_data(f"wds:{d}")
    d = copy("sha")  # same size, one byte changed
    raw = bytearray((d / "train-000002.tar").read_bytes())
    raw[700] ^= 0xFF
    (d / "train-000002.tar").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fails its sha256 check"):
        open_data(f"wds:{d}")
    # a large set is checked while streaming: the same error, raised in the main process as one line
    monkeypatch.setattr(S, "VERIFY_UPFRONT_BYTES", 0)
    ds = _ds(d)
    with pytest.raises(DataError, match="train-000002.tar' fails its sha256 check"):
        for _ in make_loader(ds, 32, train=False, workers=2):
            pass
    monkeypatch.undo()
    d = copy("stray")
    shutil.copy(d / "train-000000.tar", d / "train-000099.tar")
    with pytest.raises(DataError, match="does not list"):
        open_data(f"wds:{d}")
    d = copy("missing")
    (d / "train-000005.tar").unlink()
    assert main(["train", "--data", f"wds:{d}", "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train-000005.tar" in err and "is missing" in err
    # patterns and lists name shards of the folder; one it does not describe is refused
    src = open_data(f"wds:{shards[1]}/train-{{000000..000003}}.tar")
    assert src.num_train == 16 and src.num_val == 8
    assert open_data(f"wds:{shards[1]}/train-000001.tar,{shards[1]}/train-000002.tar").num_train == 8
    with pytest.raises(DataError, match="not listed"):
        open_data(f"wds:{tmp_path / 'stray' / 'train-000099.tar'}")


@pytest.mark.slow
def test_cli_shards_then_train_and_eval_on_them(tmp_path, capsys):
    folder = _folder(tmp_path / "imgs", per_class=8)
    out = tmp_path / "wds"
    assert main(["shards", str(folder), "--out", str(out), "--shard-size", "8KB", "--quiet"]) == 0
    assert "train: 28 samples" in capsys.readouterr().out
    assert main(["shards", str(folder), "--out", str(out)]) == 2  # never written over
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit: error: --out:") and "not empty" in err and "\n" not in err
    _rewrite_shard(out, "train-000001.tar", lambda s: [{**s[0], "jpg": b"broken"}] + s[1:] if "jpg" in s[0]
                   else [{**s[0], "png": b"broken"}] + s[1:])  # one bad sample: left out, counted in the report
    runs = tmp_path / "runs"
    assert main(["train", "--data", f"wds:{out}", "--runs-dir", str(runs), "--epochs", "2", "--max-steps", "7",
                 "--batch-size", "4", "--embed-dim", "16", "--depth", "1", "--num-heads", "2", "--patch-size", "4",
                 "--img-size", "12", "--precision", "fp32", "--quiet", "--save-every", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 7 and summary["eval"]["num_images"] == 4 and summary["skipped_images"] == 1
    cfg = json.loads((runs / "wds" / "config.json").read_text())
    assert cfg["data"]["spec"] == f"wds:{out}" and cfg["profile"]["num_train"] == 28
    assert main(["eval", str(runs / "wds"), "--json"]) == 0  # on the run's own held-out shards
    assert json.loads(capsys.readouterr().out)["num_images"] == 4
    # --resize: the shorter side brought down (JPEGs stay JPEG, PNGs PNG), the statistics say what is stored
    assert main(["shards", f"folder:{folder}", "--out", str(tmp_path / "small"), "--resize", "8", "--quiet",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_stats"]["sizes"]["width"]["max"] == 8 and info["image_stats"]["sizes"]["height"]["max"] == 9
    samples = _samples(open_data(f"wds:{tmp_path / 'small'}").shards.train.urls)
    assert {k for s in samples for k in s if k in ("jpg", "png")} == {"jpg", "png"} and len(samples) == 28


def test_shards_described_as_timm_writes_them_are_profiled_by_reading(shards, tmp_path):
    """An _info.json with timm's keys only (no class names, no profile): classes by index, the profile measured on
    the first training samples."""
    import shutil

    out = tmp_path / "timm"
    shutil.copytree(shards[1], out)
    info = json.loads((out / "_info.json").read_text())
    keep = {"train": {k: info["splits"]["train"][k] for k in ("name", "num_samples", "filenames", "shard_lengths")},
            "validation": {k: info["splits"]["validation"][k] for k in ("name", "num_samples", "filenames",
                                                                         "shard_lengths")}}
    (out / "_info.json").write_text(json.dumps({"num_classes": 4, "splits": keep}))
    src = open_data(f"wds:{out}")
    prof = src.profile()
    assert src.info.class_names == ["0", "1", "2", "3"] and prof.num_train == 32 and sum(prof.class_counts) == 32
    assert prof.sample_size == 32 and not prof.grey and "no profile in _info.json" in prof.notes[-1]


def test_bf16_check_on_shards_holds_out_whole_shards(shards):
    from vitkit.tasks.classify import _shard_check_batches

    train = _ds(shards[1])
    batches, held = _shard_check_batches(train, 4, 6)
    assert len(batches) == 6 and all(len(y) == 4 for _, y in batches)
    seen = {i for x, _ in batches for i in _identity(x)}
    kept = [i for x, _ in held for i in _identity(x)]
    assert len(kept) == 8 and not seen & set(kept)  # the last 2 shards (a quarter), never trained on
