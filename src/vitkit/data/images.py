"""The one image-reading policy: every reader (training, evaluation, prediction, embedding, explanation) turns an
image file into the model's channels through `read_image` → `to_model_mode`, so a file means the same pixels
everywhere.

- Orientation: EXIF orientation is applied (`ImageOps.exif_transpose`), as viewers show the photo.
- Bit depth: 16-bit grey ('I;16', 'I;16B', 'I;16L', 'I;16N', and 'I', which Pillow uses for 16-bit PNG/PGM/TIFF)
  is scaled 0..65535 → 0..255; 'I' beyond 0..65535 is an error. Float ('F') is read as [0, 1] intensities and
  scaled by 255; values outside [0, 1] or non-finite are an error. 16-bit colour PNGs Pillow reads as 8-bit itself.
- Colour: '1' → 0/255 grey; 'P' through its palette; 'CMYK', 'YCbCr', 'HSV', 'RGBX' by Pillow's conversions;
  'LAB' through a colour-managed LAB → sRGB transform.
- Transparency (alpha channel, palette or tRNS colour key, premultiplied modes): composited on a plain background
  of the opposite brightness of the visible content — white under dark ink, black under light ink — so an image
  whose colour is uniform and whose drawing is only in its alpha (a glyph as alpha on transparent black) keeps its
  drawing visible instead of turning blank.
- Channels: 1-channel models get luminance (ITU-R 601 luma, Pillow's 'L'), 3-channel models get RGB (grey is
  repeated). Any other mode, or another channel count, is a DataError, never a guess.

Which files are images is decided here too, once (`image_files`): a folder is searched recursively for the
extensions of `IMG_EXTENSIONS` (any case), skipping hidden files and folders (a leading '.': `.DS_Store`, macOS
`._x.jpg` resource forks, `.thumbnails/`), sorted by path. A file named explicitly is taken as it is.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..errors import DataError

# Bump when the pixels `read_image` gives for a file change: it is part of the decoded-folder cache key, so a cache
# decoded under an older policy is never served.
POLICY_VERSION = 2

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def _composite(im):
    """An 'LA' / 'RGBA' image over a solid background of the opposite brightness of its visible content."""
    from PIL import Image

    rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), np.float32)
    if alpha.min() >= 255:
        return rgba.convert("RGB")
    weight = float(alpha.sum())
    # the alpha-weighted mean luma of the colour: how bright the visible content ("ink") is
    ink = float((np.asarray(rgba.convert("L"), np.float32) * alpha).sum() / weight) if weight > 0 else 0.0
    bg = 0 if ink > 127.5 else 255
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (bg, bg, bg, 255)), rgba).convert("RGB")


def _grey(arr: np.ndarray, scale: float):
    """A numeric grey array → an 'L' image (values × scale, rounded)."""
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8), "L")


def to_model_mode(im, in_chans: int = 3, what: str = "image"):
    """A PIL image of any mode → 'L' (in_chans=1: luminance) or 'RGB' (in_chans=3), by the module's policy; a mode
    that cannot be mapped is a DataError naming `what` (the file)."""
    from PIL import Image

    if in_chans not in (1, 3):
        raise DataError(f"images can be read as 1 or 3 channels, the model wants {in_chans}; use a 1- or 3-channel "
                        "model")
    mode = im.mode
    trns = im.info.get("transparency")
    if mode == "1":
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA") if mode == "PA" or trns is not None else im.convert("RGB")
    elif mode in ("L", "RGB") and trns is not None:
        im = im.convert("LA" if mode == "L" else "RGBA")  # the tRNS colour key becomes alpha
    elif mode in ("La", "RGBa"):
        im = im.convert("RGBA")  # un-premultiplied
    elif mode in _SIXTEEN_BIT:
        arr = np.asarray(im)
        grey = _grey(arr, 255 / 65535)
        if isinstance(trns, int):
            im = Image.merge("LA", (grey, Image.fromarray(np.where(arr == trns, 0, 255).astype(np.uint8), "L")))
        else:
            im = grey
    elif mode == "I":
        arr = np.asarray(im)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DataError(f"{what} is a 32-bit integer image with values {lo}..{hi}, outside the 16-bit range "
                            "0..65535 vitkit reads such images in; convert it to 8- or 16-bit first")
        im = _grey(arr, 255 / 65535)
    elif mode == "F":
        arr = np.asarray(im)
        if arr.size and not np.isfinite(arr).all():
            raise DataError(f"{what} is a float image with NaN or infinite pixels; fix or remove it")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise DataError(f"{what} is a float image with values {lo:g}..{hi:g}; vitkit reads float images as [0, 1] "
                            "intensities: rescale it to [0, 1] or save it as 8/16-bit")
        im = _grey(arr, 255.0)
    elif mode in ("CMYK", "YCbCr", "HSV", "RGBX"):
        im = im.convert("RGB")
    elif mode == "LAB":
        from PIL import ImageCms

        t = ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                    "LAB", "RGB")
        im = ImageCms.applyTransform(im, t)
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise DataError(f"{what} has Pillow mode {mode!r}, which vitkit cannot map to image channels; convert it "
                        "to RGB or greyscale (8 or 16 bit)")
    if im.mode in ("LA", "RGBA"):
        im = _composite(im)
    return im.convert("L" if in_chans == 1 else "RGB")


def oriented_size(im):
    """(width, height) as the image is shown, from its header: EXIF orientations 5-8 swap the two."""
    w, h = im.size
    if "exif" in im.info:  # only where the header carries EXIF: getexif() would decode a PNG whose EXIF trails
        try:
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                return h, w
        except Exception:  # noqa: BLE001 - unreadable EXIF: the stored size is the best we know
            pass
    return w, h


def header_size(source) -> tuple:
    """(width, height) as stored in an image's header, without decoding its pixels: a size check (a decompression
    bomb) can refuse an image before `read_image` decodes it. Pillow's own errors propagate (UnidentifiedImageError:
    not an image format; DecompressionBombError: past Pillow's cap)."""
    from PIL import Image

    with Image.open(source) as im:
        return im.size


def image_text(path) -> dict:
    """An image file's text metadata (PNG tEXt/iTXt chunks), without decoding its pixels; {} if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", None) or {})
    except Exception:  # noqa: BLE001 - a missing or foreign file simply has no text we know
        return {}


def read_image(path, in_chans: int = 3, draft_size: Optional[int] = None):
    """An image file → a PIL image in 'L' (1 channel) or 'RGB' (3 channels) by the module's policy (orientation,
    bit depth, palette, colour space, transparency), or a DataError that names the file. `draft_size`: let a JPEG
    decode at a reduced scale no smaller than this (much faster when only a small image is needed)."""
    from PIL import Image, ImageOps

    if in_chans not in (1, 3):
        raise DataError(f"images can be read as 1 or 3 channels, the model wants {in_chans}; use a 1- or 3-channel "
                        "model")
    try:
        with Image.open(path) as im:
            if draft_size:
                # grey or colour decoding straight from the JPEG's own planes; other modes keep theirs
                im.draft(("L" if in_chans == 1 else "RGB") if im.mode in ("L", "RGB") else None,
                         (draft_size, draft_size))
            im.load()
            if ("exif" in im.info or im.format == "TIFF") and im.getexif().get(0x0112, 1) != 1:
                im = ImageOps.exif_transpose(im)
            return to_model_mode(im, in_chans, what=f"image {str(path)!r}")
    except DataError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} does not exist; check the path") from None
    except Exception as e:
        raise DataError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from None


def is_image_name(name: str) -> bool:
    """Whether a file name is an image by the listing rule: an image extension and not hidden."""
    # str.endswith over the (lower-case) extensions: what splitext(name)[1].lower() in IMG_EXTENSIONS says for a
    # name that does not start with a dot, ~4x faster (a folder scan calls it once a file)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def image_files(folder) -> List[Path]:
    """Image files under `folder` (recursively, hidden files and folders skipped), sorted by their path string."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out += [os.path.join(dirpath, n) for n in filenames if is_image_name(n)]
    return [Path(p) for p in sorted(out)]


def list_images(folder) -> List[Path]:
    """`image_files(folder)`, or a DataError when the folder is missing, is a file, or holds no images."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"folder {str(folder)!r} does not exist; check the path")
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is a file, not a folder of images; pass the folder that holds the images")
    files = image_files(folder)
    if not files:
        raise DataError(f"folder {str(folder)!r} holds no images (looked for {', '.join(IMG_EXTENSIONS)} "
                        "files, recursively); put images in it or point at another folder")
    return files


def collect_images(paths: Sequence) -> List[Path]:
    """Image files from files (taken as given) and folders (`image_files`), in the order given; a missing path is a
    FileNotFoundError, an imageless folder or an empty list a DataError."""
    files: List[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"image path {str(p)!r} does not exist; check the path")
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise DataError(f"folder {str(p)!r} holds no images ({', '.join(IMG_EXTENSIONS)})")
            files += found
        else:
            files.append(p)
    if not files:
        raise DataError("no images given; pass image files or folders")
    return files


__all__ = ["POLICY_VERSION", "IMG_EXTENSIONS", "read_image", "to_model_mode", "oriented_size", "image_text",
           "is_image_name", "image_files", "list_images", "collect_images", "header_size"]
