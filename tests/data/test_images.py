"""The one image-reading policy: every Pillow mode against a reference conversion written here in numpy, alpha-only
drawings kept visible, high bit depths scaled, EXIF orientation applied, unmappable images refused."""
import colorsys
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.data.images import read_image, to_model_mode
from vitkit.errors import DataError

RNG = np.random.default_rng(0)


def _luma(rgb):
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _composite(rgb, alpha):
    """Reference: colour over a background of the opposite brightness of the alpha-weighted mean luma."""
    a = alpha.astype(np.float64) / 255
    ink = (_luma(rgb) * a).sum() / a.sum()
    bg = 0.0 if ink > 127.5 else 255.0
    return rgb * a[..., None] + bg * (1 - a[..., None])


def _check(path, ref_rgb, tol=1.0):
    """read_image gives the reference RGB for a 3-channel model and its luma for a 1-channel model."""
    got3 = np.asarray(read_image(path, 3), np.float64)
    got1 = np.asarray(read_image(path, 1), np.float64)
    assert got3.shape == ref_rgb.shape and got1.shape == ref_rgb.shape[:2]
    assert np.abs(got3 - ref_rgb).max() <= tol, np.abs(got3 - ref_rgb).max()
    assert np.abs(got1 - _luma(ref_rgb)).max() <= tol + 1


def _grey3(v):
    return np.repeat(np.asarray(v, np.float64)[..., None], 3, axis=-1)


def test_every_mode_matches_its_reference_conversion(tmp_path):
    h, w = 6, 5
    rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    grey = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    bits = RNG.integers(0, 2, (h, w)).astype(bool)
    cases = {}
    Image.fromarray(bits).save(tmp_path / "1.png")
    cases["1.png"] = _grey3(bits * 255.0)
    Image.fromarray(grey, "L").save(tmp_path / "L.png")
    cases["L.png"] = _grey3(grey)
    Image.fromarray(rgb, "RGB").save(tmp_path / "RGB.png")
    cases["RGB.png"] = rgb.astype(np.float64)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "LA.png")
    cases["LA.png"] = _composite(_grey3(grey), alpha)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "RGBA.png")
    cases["RGBA.png"] = _composite(rgb.astype(np.float64), alpha)
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 8, (h, w), dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette.ravel().tolist())
    p.save(tmp_path / "P.png")
    cases["P.png"] = palette[idx].astype(np.float64)
    p.save(tmp_path / "P_trns.png", transparency=3)
    cases["P_trns.png"] = _composite(palette[idx].astype(np.float64), np.where(idx == 3, 0, 255))
    cmyk = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "CMYK.tif")
    c = cmyk.astype(np.float64)
    cases["CMYK.tif"] = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
    ycc = RNG.integers(16, 240, (h, w, 3), dtype=np.uint8)
    Image.frombytes("YCbCr", (w, h), ycc.tobytes()).save(tmp_path / "YCbCr.tif")
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    cases["YCbCr.tif"] = np.clip(np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                                           y + 1.772 * (cb - 128)], -1), 0, 255)
    wide = RNG.integers(0, 65536, (h, w)).astype(np.uint16)
    Image.frombytes("I;16", (w, h), wide.astype("<u2").tobytes()).save(tmp_path / "I16.png")
    cases["I16.png"] = _grey3(wide / 257.0)
    Image.frombytes("I;16B", (w, h), wide.astype(">u2").tobytes()).save(tmp_path / "I16B.tif")
    cases["I16B.tif"] = _grey3(wide / 257.0)
    Image.fromarray(wide.astype(np.int32), "I").save(tmp_path / "I.tif")
    cases["I.tif"] = _grey3(wide / 257.0)
    f = RNG.random((h, w)).astype(np.float32)
    Image.fromarray(f, "F").save(tmp_path / "F.tif")
    cases["F.tif"] = _grey3(f * 255.0)
    modes = {name: Image.open(tmp_path / name).mode for name in cases}
    assert modes["I16B.tif"] == "I;16B" and modes["I.tif"] == "I" and modes["YCbCr.tif"] == "YCbCr"
    for name, ref in cases.items():
        tol = 2.0 if name == "YCbCr.tif" else 1.0
        try:
            _check(tmp_path / name, ref, tol)
        except AssertionError as e:
            raise AssertionError(f"{name} (mode {modes[name]}): {e}") from None


def test_in_memory_modes_without_a_file_format():
    """Modes no writer keeps (premultiplied, RGBX, PA) map like their plain relatives."""
    rgb = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    x = np.asarray(to_model_mode(Image.fromarray(rgb).convert("RGBX"), 3))
    assert np.array_equal(x, rgb)
    opaque = Image.fromarray(np.dstack([rgb, np.full((4, 4), 255, np.uint8)]), "RGBA")
    assert np.array_equal(np.asarray(to_model_mode(opaque.convert("RGBa"), 3)), rgb)
    hsv = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ref = np.array([[colorsys.hsv_to_rgb(*(px / 255.0)) for px in row] for row in hsv]) * 255
    got = np.asarray(to_model_mode(Image.frombytes("HSV", (4, 4), hsv.tobytes()), 3), np.float64)
    assert np.abs(got - ref).max() <= 1


def test_a_glyph_drawn_only_in_alpha_is_not_blank(tmp_path):
    """The issue's case: colour channels uniform, the drawing only in alpha. Black ink → on white; white ink → on
    black; either way the glyph stays visible, for 1- and 3-channel models."""
    glyph = np.zeros((16, 16), np.uint8)
    glyph[3:13, 7:9] = 255  # a stroke
    glyph[11:13, 4:12] = 255
    for colour, ink_dark in ((0, True), (255, False)):
        rgba = np.dstack([np.full((16, 16, 3), colour, np.uint8), glyph])
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"g{colour}.png")
        for chans in (1, 3):
            x = np.asarray(read_image(tmp_path / f"g{colour}.png", chans), np.float64)
            x = x if x.ndim == 2 else x.mean(-1)
            ink, paper = x[glyph == 255].mean(), x[glyph == 0].mean()
            assert abs(ink - paper) == 255, (colour, chans, ink, paper)
            assert (ink < paper) == ink_dark


def test_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG at mid-grey comes out mid-grey (Pillow's own convert clips it to 255, nearly white); a
    48-bit colour PNG (written by hand: Pillow does not write one) keeps its colours."""
    mid = np.full((4, 4), 32896, np.uint16)  # 128 * 257
    Image.frombytes("I;16", (4, 4), mid.astype("<u2").tobytes()).save(tmp_path / "mid.png")
    assert (np.asarray(read_image(tmp_path / "mid.png", 1)) == 128).all()
    assert (np.asarray(read_image(tmp_path / "mid.png", 3)) == 128).all()
    px = np.array([[[65535, 32896, 0], [257, 0, 65535]]], ">u2")  # (1, 2, 3)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + row.tobytes() for row in px)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgb48.png").write_bytes(png)
    assert np.asarray(read_image(tmp_path / "rgb48.png", 3)).tolist() == [[[255, 128, 0], [1, 0, 255]]]


def test_exif_orientation_is_applied(tmp_path):
    """A JPEG stored landscape with orientation 6 (rotate 90° clockwise to show) reads as the portrait it shows,
    and the folder scan reports the shown size."""
    from vitkit.data.folders import _headers

    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=exif, quality=95)
    x = np.asarray(read_image(tmp_path / "o.jpg", 1), np.float64)
    assert x.shape == (40, 20)  # portrait
    assert x[:15].mean() > 200 and x[25:].mean() < 50  # the stored left half is now on top
    assert _headers([str(tmp_path / "o.jpg")])[0][:2] == (20, 40)


def test_what_cannot_be_mapped_is_an_error_naming_the_file(tmp_path):
    Image.fromarray(np.full((3, 3), 7.5, np.float32), "F").save(tmp_path / "hdr.tif")
    with pytest.raises(DataError, match=r"hdr\.tif.*\[0, 1\]"):
        read_image(tmp_path / "hdr.tif", 3)
    Image.fromarray(np.full((3, 3), 1 << 20, np.int32), "I").save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif.*0\.\.65535"):
        read_image(tmp_path / "big.tif", 1)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match="1 or 3 channels"):
        read_image(tmp_path / "ok.png", 4)
    with pytest.raises(DataError, match="cannot map"):
        to_model_mode(_fake_mode_image(), 3)


def _fake_mode_image():
    im = Image.new("L", (2, 2))
    im._mode = "I;16S"  # a signed 16-bit mode Pillow can open from some TIFFs; vitkit does not guess its range
    return im


def test_decoded_folder_cache_key_follows_the_reading_policy(tmp_path, monkeypatch):
    """A change of policy (its version) changes the folder cache key, so pixels decoded under the old one are
    never served."""
    import vitkit.data.images as images
    from vitkit.data.folders import scan_folder

    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "f" / c / "0.png")
    scan = scan_folder(tmp_path / "f")
    key = scan.listing_key(size=4, in_chans=1)
    monkeypatch.setattr(images, "POLICY_VERSION", images.POLICY_VERSION + 1)
    assert scan.listing_key(size=4, in_chans=1) != key


def test_every_reader_goes_through_the_policy():
    """No module but data/images.py decodes pixels or picks a channel mode itself (the folder scan opens headers)."""
    src = Path(__file__).resolve().parents[2] / "src" / "vitkit"
    offenders = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        text = path.read_text()
        if rel != "data/images.py" and re.search(r"\.convert\(\s*[\"'](RGB|L)[\"']", text):
            offenders.append(f"{rel}: .convert")
        if rel not in ("data/images.py", "data/folders.py") and "Image.open(" in text:
            offenders.append(f"{rel}: Image.open")
    assert offenders == []


def _tree(root: Path) -> None:
    """Images, hidden files and folders, files that are no images, and names that sort differently as paths."""
    for rel in ["b/1.png", "b/2.JPG", "a.png", "a b/x.png", "b/.hidden.png", "._a.png", ".thumbs/t.png",
                "b/.cache/c.png", "b/notes.txt", "b/noext", "c/d/e.webp"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(p, format="PNG") if p.suffix else p.write_text("x")
    (root / "b" / "notes.txt").write_text("not an image")


def test_one_listing_rule_skips_hidden_and_non_image_files(tmp_path):
    """Every lister (tasks' folders, predict/reconstruct's paths, the training scan) sees the same images: by
    extension in any case, hidden files and folders skipped, in the same order."""
    from vitkit.data import collect_images, image_files, list_images
    from vitkit.data.folders import scan_folder

    _tree(tmp_path)
    want = [tmp_path / r for r in ["a b/x.png", "a.png", "b/1.png", "b/2.JPG", "c/d/e.webp"]]
    assert image_files(tmp_path) == want
    assert list_images(tmp_path) == want
    assert collect_images([tmp_path]) == want
    hidden = tmp_path / "b" / ".hidden.png"
    assert collect_images([hidden, tmp_path / "b"]) == [hidden] + want[2:4]  # a file named explicitly is taken
    scan = scan_folder(tmp_path)
    assert scan.classes == ["a b", "b", "c"] and scan.files == [str(p) for p in want if p.parent != tmp_path]


def test_listing_errors_say_what_is_wrong(tmp_path):
    from vitkit.data import collect_images, list_images

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".x.png").write_bytes(b"")
    with pytest.raises(DataError, match="holds no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="holds no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_images([tmp_path / "nope"])
    with pytest.raises(DataError, match="is a file"):
        list_images(tmp_path / "empty" / ".x.png")
