"""Datasets: the embedded split, image folders (corrupt files), torchvision's on-disk formats, the loader."""
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import MixUp, build_datasets, make_loader
from vitkit.errors import DataError


def test_mnist5k_is_a_fixed_stratified_4000_1000_split():
    train, val, info = build_datasets("mnist5k")
    assert (len(train), len(val)) == (4000, 1000)
    assert torch.bincount(val.labels).tolist() == [100] * 10
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert info.class_names == [str(i) for i in range(10)] and info.in_chans == 1 and info.img_size == (28, 28)
    # the held-out digits do not depend on the training seed
    _, val2, _ = build_datasets("mnist5k", seed=123)
    assert torch.equal(val.images, val2.images)
    # real digits: mostly black background, some bright strokes
    assert train.images.float().mean() < 60 and train.images.max() == 255


def test_digits_and_channel_conversion():
    train, val, info = build_datasets("digits", img_size=16, in_chans=3)
    assert len(train) + len(val) == 1797 and info.in_chans == 3
    x, y = next(iter(make_loader(val, 32, train=False)))
    assert x.shape == (32, 3, 16, 16) and y.shape == (32,)
    assert torch.allclose(x[:, 0], x[:, 1])


def test_loader_is_deterministic_and_shards_the_global_batch():
    train, val, info = build_datasets("mnist5k", max_train=200)
    a = list(make_loader(train, 64, train=True, seed=1, epoch=2))
    b = list(make_loader(train, 64, train=True, seed=1, epoch=2))
    c = list(make_loader(train, 64, train=True, seed=1, epoch=3))
    assert len(a) == 3  # 200 // 64, last partial batch dropped when training
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])  # a new epoch reshuffles
    # two ranks' halves together are exactly the one-process batch (order and augmentation)
    r0 = list(make_loader(train, 64, train=True, seed=1, epoch=2, rank=0, world=2))
    r1 = list(make_loader(train, 64, train=True, seed=1, epoch=2, rank=1, world=2))
    for (x, y), (x0, y0), (x1, y1) in zip(a, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # augmentation changes the images; evaluation batches are not augmented
    ev = next(iter(make_loader(val, 64, train=False)))[0]
    raw = (val.images[:64].float() / 255 - info.mean[0]) / info.std[0]  # normalised by the measured statistics
    assert abs(info.mean[0] - 0.1307) < 0.01 and abs(info.std[0] - 0.3081) < 0.01  # MNIST's published ones
    assert torch.allclose(ev, raw, atol=1e-6)
    plain, _, _ = build_datasets("mnist5k", max_train=200, augment="none")
    xp, yp = next(iter(make_loader(plain, 64, train=True, seed=1, epoch=2)))
    assert torch.equal(yp, a[0][1]) and (xp - a[0][0]).abs().mean() > 0.1


def test_mixup_gives_soft_targets_that_sum_to_one():
    train, _, _ = build_datasets("mnist5k", max_train=100, augment="strong")
    x, y = next(iter(make_loader(train, 32, train=True, mixup=MixUp(10, 0.8, 1.0))))
    assert y.shape == (32, 10) and torch.allclose(y.sum(1), torch.ones(32))


def _write_folder(root, classes=("cat", "dog"), n=6, size=20, mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}.png")


def test_image_folder_skips_corrupt_files_and_strict_names_them(tmp_path, caplog):
    _write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (tmp_path / "imgs" / "dog" / "0.png").read_bytes()
    (tmp_path / "imgs" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    train, val, info = build_datasets(f"folder:{tmp_path / 'imgs'}", img_size=16, in_chans=1, val_split=0.34)
    assert info.class_names == ["cat", "dog"] and len(info.skipped) == 2
    assert len(train) + len(val) == 12 and len(val) == 4
    assert "skipping unreadable image" in caplog.text
    x, y = next(iter(make_loader(train, 4, train=True)))
    assert x.shape == (4, 1, 16, 16)
    with pytest.raises(DataError, match="broken.png"):
        build_datasets(f"folder:{tmp_path / 'imgs'}", strict=True)


def test_image_folder_train_val_layout_and_bad_folders(tmp_path):
    _write_folder(tmp_path / "tv" / "train", n=3)
    _write_folder(tmp_path / "tv" / "val", n=2)
    train, val, info = build_datasets(f"folder:{tmp_path / 'tv'}", img_size=16)
    assert (len(train), len(val)) == (6, 4) and info.in_chans == 3
    _write_folder(tmp_path / "empty", n=2)
    (tmp_path / "empty" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra.*holds no images"):
        build_datasets(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="unknown dataset 'cifar11'.*did you mean cifar10.*mnist5k"):
        build_datasets("cifar11")


# ---- torchvision's own formats, written small, read by torchvision with download=False -------------------------
def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x0800 + arr.ndim  # unsigned byte, ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_formats(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    train, val, info = build_datasets(name, data_dir=tmp_path)
    assert (len(train), len(val), info.num_classes, info.in_chans) == (30, 10, 10, 1)
    assert train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    x, _ = next(iter(make_loader(val, 10, train=False)))
    assert x.shape == (10, 1, 28, 28)
    with pytest.raises(DataError, match="--download"):
        build_datasets(name, data_dir=tmp_path / "elsewhere")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_cifar_formats(tmp_path, name, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # Our files are tiny, so their checksums are not CIFAR's: check that they exist, read them with torchvision.
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: __import__("os").path.isfile(fpath))
    cls = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    base = tmp_path / cls.base_folder
    base.mkdir()
    rng = np.random.default_rng(0)
    k = 10 if name == "cifar10" else 100
    key = "labels" if name == "cifar10" else "fine_labels"
    for fname, _ in cls.train_list + cls.test_list:
        n = 8
        entry = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(range(n))}
        with open(base / fname, "wb") as f:
            pickle.dump(entry, f)
    with open(base / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(k)]}, f)
    train, val, info = build_datasets(name, data_dir=tmp_path)
    assert len(train) == 8 * len(cls.train_list) and len(val) == 8 and info.num_classes == k
    assert info.class_names[3] == "class3" and info.in_chans == 3 and train.images.shape[1:] == (3, 32, 32)
    x, y = next(iter(make_loader(train, 8, train=True)))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()


# ---- folders in memory: decoded once, cached by the listing, never stale ----------------------------------------
def test_folder_is_decoded_once_cached_and_never_served_stale(tmp_path, monkeypatch):
    import vitkit.data.folders as folders

    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    _write_folder(tmp_path / "f", n=5, size=12)
    spec = f"folder:{tmp_path / 'f'}"
    train, val, info = build_datasets(spec, img_size=12, val_split=0.2, augment="none", progress=False)
    assert type(train).__name__ == "InMemoryDataset" and train.images.shape[1:] == (3, 12, 12)
    # the decoded pixels are the files' own (same size: no resampling)
    from vitkit.data import open_data

    src = open_data(spec, val_split=0.2)
    first = src.scan.files[src.train_idx[0]]
    assert torch.equal(train.images[0], torch.from_numpy(np.asarray(Image.open(first)).transpose(2, 0, 1).copy()))
    calls = []
    real = folders._decode_chunk
    monkeypatch.setattr(folders, "_decode_chunk", lambda args: calls.append(len(args[0])) or real(args))
    again, _, _ = build_datasets(spec, img_size=12, val_split=0.2, augment="none", progress=False)
    assert calls == [] and torch.equal(again.images, train.images)  # served from the cache, nothing decoded
    # a changed file (same name and size, new pixels) makes a new listing key: decoded again, new pixels served
    arr = np.full((12, 12, 3), 7, np.uint8)
    Image.fromarray(arr).save(first)
    changed, _, _ = build_datasets(spec, img_size=12, val_split=0.2, augment="none", progress=False)
    assert calls and (changed.images[0] == 7).all() and not torch.equal(changed.images, train.images)


def test_big_folders_stream_from_disk_and_skip_bad_files_mid_epoch(tmp_path, monkeypatch, caplog):
    _write_folder(tmp_path / "s", n=4, size=16)
    good = (tmp_path / "s" / "dog" / "0.png").read_bytes()
    (tmp_path / "s" / "dog" / "cut.png").write_bytes(good[: len(good) // 2])  # header fine, pixels truncated
    monkeypatch.setenv("VITKIT_MEMORY_LIMIT", "100")  # bytes: nothing fits, so the folder streams
    train, val, info = build_datasets(f"folder:{tmp_path / 's'}", img_size=16, val_split=0.25, augment="none",
                                      seed=3)
    assert type(train).__name__ == "ImageFolderDataset"
    seen = sum(len(y) for _, y in make_loader(train, 2, train=False))
    assert seen == len(train) - any("cut.png" in p for p, _ in train.samples)
    assert "cut.png" in caplog.text or all("cut.png" not in p for p, _ in train.samples)


def test_profile_measures_colour_and_mirror_symmetry(tmp_path):
    """Oriented glyphs (an 'L' and a mirrored 'L') are not mirror-symmetric; symmetric blobs are; colour files with
    equal channels count as grey."""
    from vitkit.data import open_data

    rng = np.random.default_rng(0)
    for name, mirror in (("glyphs", False), ("blobs", True)):
        for c in range(2):
            d = tmp_path / name / f"c{c}"
            d.mkdir(parents=True)
            for i in range(20):
                a = np.zeros((16, 16), np.uint8)
                if mirror:
                    r = 3 + c * 3
                    yy, xx = np.mgrid[:16, :16]
                    a[(yy - 8) ** 2 + (xx - 7.5) ** 2 < r * r] = 200
                else:
                    a[2:14, 3:5] = 220  # an 'L' ...
                    a[12:14, 3:11] = 220
                    if c:
                        a = a[:, ::-1]  # ... and its mirror image: the class is told by orientation only
                a = np.clip(a + rng.integers(0, 30, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(np.stack([a] * 3, -1)).save(d / f"{i}.png")
    glyphs = open_data(f"folder:{tmp_path / 'glyphs'}").profile()
    blobs = open_data(f"folder:{tmp_path / 'blobs'}").profile()
    assert not glyphs.mirror_symmetric and blobs.mirror_symmetric
    assert glyphs.grey and glyphs.in_chans == 1 and glyphs.native_size == (16, 16)
    assert glyphs.num_classes == 2 and glyphs.class_counts == [18, 18] and glyphs.imbalance == 1.0


def test_progressive_sizes_and_augmentation_ramp_follow_the_schedule():
    from vitkit.data import AugmentConfig, BatchTransform

    tf = BatchTransform(32, [0.5] * 3, [0.25] * 3, AugmentConfig(rand_ops=2, erase=0.5, ramp=0.5), min_size=16,
                        multiple=4)
    sizes = [tf.size_at(p) for p in (0.0, 0.2, 0.4, 0.6, 0.75, 1.0)]
    assert sizes[0] == (16, 16) and sizes[-2:] == [(32, 32), (32, 32)]
    assert all(a[0] <= b[0] and a[0] % 4 == 0 for a, b in zip(sizes, sizes[1:]))  # growing, in whole tokens
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    assert tf(x, torch.Generator().manual_seed(0), progress=0.3).shape == (8, 3, 20, 20)
    assert AugmentConfig(ramp=0.5).strength(0.0) == 0.0 and AugmentConfig(ramp=0.5).strength(0.25) == 0.5
    assert AugmentConfig(ramp=0.5).strength(0.9) == 1.0 and AugmentConfig().strength(0.0) == 1.0
    # at progress 0 with a ramp nothing random but the base affine applies: the same as no RandAugment at all
    plain = BatchTransform(32, [0.5] * 3, [0.25] * 3, AugmentConfig(ramp=0.5, rand_ops=0, erase=0.0))
    ramped = BatchTransform(32, [0.5] * 3, [0.25] * 3, AugmentConfig(ramp=0.5, rand_ops=2, erase=0.5))
    a = plain(x.clone(), torch.Generator().manual_seed(1), progress=0.0)
    b = ramped(x.clone(), torch.Generator().manual_seed(1), progress=0.0)
    assert a.shape == b.shape
    mix = MixUp(10, 0.8, 1.0, ramp=0.5)
    y = torch.arange(8) % 10
    _, t0 = mix(x.float(), y, torch.Generator().manual_seed(0), progress=0.0)
    assert torch.equal(t0.argmax(1), y) and (t0.max(1).values > 0.85).all()  # no mixing at the start


def test_batch_randaugment_ops_keep_range_and_shape_and_shard_exactly():
    from vitkit.data import AugmentConfig, BatchTransform
    from vitkit.data.transforms import COLOUR_OPS

    x = torch.rand(16, 3, 12, 12)
    m, sign = torch.rand(16), torch.where(torch.rand(16) < 0.5, -1.0, 1.0)
    for op in COLOUR_OPS:
        y = op(x.clone(), m, sign)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, op.__name__
    full_m = torch.ones(16)
    assert torch.allclose(COLOUR_OPS[0](x.clone(), full_m, -torch.ones(16)), x * 0.1, atol=1e-6)  # brightness
    assert torch.equal(COLOUR_OPS[5](x.clone(), torch.zeros(16), sign), x)  # solarize at threshold 1: unchanged
    tf = BatchTransform(12, [0.5] * 3, [0.25] * 3, AugmentConfig(rand_ops=2, hflip=True))
    u8 = torch.randint(0, 255, (8, 3, 12, 12), dtype=torch.uint8)
    whole = tf(u8.clone(), torch.Generator().manual_seed(5), 0, 8)
    halves = [tf(u8[i:i + 4].clone(), torch.Generator().manual_seed(5), i, 8) for i in (0, 4)]
    assert torch.equal(torch.cat(halves), whole)  # each process's slice is the one-process batch's
