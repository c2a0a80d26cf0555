"""Folder scans at scale: the parallel scan finds what the serial one does, and the cached listing is reused only
for files that have not changed (changed, added, removed and racily rewritten files are always seen)."""
import os

import numpy as np
import pytest
from PIL import Image

import vitkit.data.folders as folders
from vitkit.data.folders import scan_folder
from vitkit.data.images import image_files


def _png(path, w, h, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (w, h), 128).save(path)


def _folder(root):
    """Three classes with sub-folders, odd names, hidden files, a non-image, an unreadable 'image' and a linked
    folder (which the listing rule does not enter)."""
    for ci, c in enumerate(("ant", "bee", "cat")):
        for i in range(7):
            _png(root / c / f"{i:02d}.png", 5 + i, 4 + ci, "L" if i % 3 == 0 else "RGB")
        _png(root / c / "deep" / "er" / "x.PNG", 9, 9)
        _png(root / c / ".hidden.png", 3, 3)
        _png(root / c / ".thumbs" / "t.png", 3, 3)
        (root / c / "notes.txt").write_text("not an image")
    (root / "bee" / "broken.jpg").write_bytes(b"not a jpeg")
    os.symlink(root / "ant", root / "cat" / "linked")
    return root


def _same(a, b):
    assert a.files == b.files and a.classes == b.classes and a.split == b.split and a.modes == b.modes
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.sizes, b.sizes) and a.skipped == b.skipped


def test_parallel_scan_equals_serial_scan_and_the_listing_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f")
    serial = scan_folder(root, workers=1, use_cache=False)
    parallel = scan_folder(root, workers=2, use_cache=False)
    _same(serial, parallel)
    # what scan_folder found before it listed in parallel: image_files per class, headers read one by one
    want = [str(f) for c in serial.classes for f in image_files(root / c)]
    heads = folders._headers(want)
    assert serial.files == [f for f, h in zip(want, heads) if h is not None]
    assert serial.skipped == [str(root / "bee" / "broken.jpg")]
    assert [tuple(s) + (m,) for s, m in zip(serial.sizes.tolist(), serial.modes)] == [h for h in heads if h]
    assert not any("linked" in f or "/." in f for f in serial.files) and any(f.endswith("x.PNG") for f in serial.files)


def _counting(monkeypatch):
    """Record the files whose headers a scan reads."""
    read = []
    real = folders._headers
    monkeypatch.setattr(folders, "_headers", lambda files: read.extend(files) or real(files))
    return read


@pytest.mark.parametrize("racy_ns", [0, -10**18], ids=["times", "stat-only"])
def test_rescan_reads_only_changed_and_added_files_and_never_serves_a_stale_listing(tmp_path, monkeypatch, racy_ns):
    """`stat-only` trusts every cached time (no racy margin), so the stat comparison alone must see each change."""
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folders, "RACY_NS", racy_ns)
    root = _folder(tmp_path / "f")
    first = scan_folder(root, workers=1)
    read = _counting(monkeypatch)
    _same(scan_folder(root, workers=1), first)
    assert read == []  # unchanged: every header from the listing

    changed = root / "ant" / "03.png"
    _png(changed, 31, 17)  # rewritten in place: the class folder's mtime does not change
    added = root / "cat" / "new.png"
    _png(added, 12, 13)
    removed = root / "bee" / "02.png"
    removed.unlink()
    again = scan_folder(root, workers=1)
    assert sorted(read) == sorted([str(changed), str(added)])
    _same(again, scan_folder(root, workers=1, use_cache=False))
    assert tuple(again.sizes[again.files.index(str(changed))]) == (31, 17)
    assert str(added) in again.files and str(removed) not in again.files
    # a file that could not be read and then is fixed is read again
    _png(root / "bee" / "broken.jpg", 8, 8)
    fixed = scan_folder(root, workers=1)
    assert str(root / "bee" / "broken.jpg") in fixed.files and fixed.skipped == []


def test_a_same_stat_rewrite_right_after_the_scan_is_read_again(tmp_path, monkeypatch):
    """Coarse file times can leave a file rewritten just after a scan with the stat the listing holds; such
    'racily clean' entries (times within RACY_NS of the listing) are never trusted. Simulated by handing the scan the
    old stat of the rewritten file."""
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f")
    first = scan_folder(root, workers=1)
    target = str(root / "cat" / "01.png")
    old_stat = folders._list_dir(str(root / "cat"))
    _png(root / "cat" / "01.png", 40, 30)
    real = folders._list_dir

    def coarse(folder):
        paths, stats = real(folder)
        for i, p in enumerate(paths):
            if p == target:
                stats[i] = old_stat[1][old_stat[0].index(p)]
        return paths, stats

    monkeypatch.setattr(folders, "_list_dir", coarse)
    assert tuple(first.sizes[first.files.index(target)]) != (40, 30)
    again = scan_folder(root, workers=1)
    assert tuple(again.sizes[again.files.index(target)]) == (40, 30)


def test_a_damaged_listing_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f")
    first = scan_folder(root, workers=1)
    for p in (tmp_path / "cache" / "folders").glob("*.listing.npz"):
        p.write_bytes(b"garbage")
    _same(scan_folder(root, workers=1), first)
