"""Request bodies → images, in memory only: an upload is never written to disk, no URL is fetched and no path
from a request is opened. Three ways to send an image: a multipart form file, a raw `image/*` (or
application/octet-stream) body, or JSON `{"image": "<base64 or data: URI>"}`. Decoding goes through
`vitkit.data.read_image`, the reading policy `vitkit predict` uses, behind a pixel-count cap (decompression bombs)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from typing import Optional, Tuple

from ..data import read_image
from ..data.images import header_size
from ..errors import DataError
from .errors import ServeError


async def read_body(request, limit: int, timeout: float = 0.0) -> bytes:
    """The request body, refused with 413 past `limit` bytes: first by its Content-Length, then while it streams
    (a chunked upload has none), so an oversized body is never held whole; and with 408 when it has not fully
    arrived `timeout` seconds (0: no limit) after the read began, so a client that trickles its body a byte at a
    time cannot hold a connection and a handler forever (--timeout bounds only the wait for the model, and uvicorn
    has no body timeout)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size, stream = [], 0, request.stream()
    while True:
        try:
            chunk = await (asyncio.wait_for(anext(stream), max(deadline - loop.time(), 0.0)) if timeout
                           else anext(stream))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ServeError(408, "body_timeout", f"the request body did not fully arrive within {timeout:g} s "
                             "(--body-timeout); send it faster", {"Connection": "close"}) from None
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int, limit: int) -> ServeError:
    return ServeError(413, "too_large", f"the request body is {'at least ' if size else ''}{size:,} bytes, above the "
                      f"server's limit of {limit:,} (--max-upload-mb); send a smaller image")


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The first file part (else the first part) of a multipart/form-data body, parsed in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServeError(422, "bad_multipart", "the multipart body has no boundary in its Content-Type; send the "
                         "image as a form file, a raw image/* body or JSON base64")
    parts, cur = [], {}

    def on_part_begin():
        cur.clear()
        cur.update(data=[], headers=[], name=None)

    def on_header_field(data, start, end):
        cur["headers"].append([data[start:end], b""])

    def on_header_value(data, start, end):
        cur["headers"][-1][1] += data[start:end]

    def on_part_data(data, start, end):
        cur["data"].append(data[start:end])

    def on_part_end():
        heads = {k.lower(): v for k, v in cur["headers"]}
        parts.append((b"filename=" in heads.get(b"content-disposition", b""), b"".join(cur["data"])))

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_part_data": on_part_data,
                                        "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # noqa: BLE001 - the library's parse errors, said in one line
        raise ServeError(422, "bad_multipart", f"the multipart body cannot be parsed ({e}); send the image as a form "
                         "file named 'file'") from None
    files = [data for is_file, data in parts if is_file] or [data for _, data in parts]
    if not files:
        raise ServeError(422, "no_image", "the multipart form holds no file; send the image as a form file")
    return files[0]


def b64_image(text) -> bytes:
    """Base64 text (or a `data:image/...;base64,` URI) → bytes, or 422."""
    if not isinstance(text, str) or not text:
        raise ServeError(422, "no_image", "expected the image as a base64 string")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(422, "bad_base64", "the image is not valid base64; encode the file's bytes with base64") \
            from None


def image_bytes(body: bytes, content_type: Optional[str]) -> Tuple[bytes, dict]:
    """The image bytes of a request body by its Content-Type, and any JSON options sent with it."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return _multipart_file(body, content_type), {}
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise ServeError(422, "bad_json", f"the body is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or "image" not in doc:
            raise ServeError(422, "no_image", 'expected JSON {"image": "<base64>"}')
        return b64_image(doc["image"]), {k: v for k, v in doc.items() if k != "image"}
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        return body, {}
    raise ServeError(415, "unsupported_media_type", f"Content-Type {ctype!r} is not an image; send multipart/form-data,"
                     " image/* or application/json with base64")


class _Upload(io.BytesIO):
    """An upload's bytes, named 'the upload' in the reading policy's error messages (never a path)."""

    def __str__(self) -> str:
        return "upload"


def decode(data: bytes, channels: int, max_pixels: int):
    """Image bytes → a PIL image in the model's channels by vitkit's reading policy. 415: not an image format;
    413: more than `max_pixels` pixels (checked from the header, before the pixels are decoded); 422: an image
    that does not decode (truncated, damaged)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServeError(422, "no_image", "the request holds no image bytes")
    try:
        w, h = header_size(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ServeError(413, "too_many_pixels", f"the image is a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ServeError(415, "not_an_image", f"the {len(data):,} bytes sent are not an image format Pillow reads "
                         "(PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    except Exception as e:  # noqa: BLE001 - a damaged header
        raise ServeError(422, "bad_image", f"the image header cannot be read ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise ServeError(413, "too_many_pixels", f"the image is {w}x{h} = {w * h:,} pixels, above the server's cap of "
                         f"{max_pixels:,} (--max-pixels); send a smaller image")
    try:
        return read_image(_Upload(data), channels)
    except DataError as e:
        raise ServeError(422, "bad_image", str(e)) from None


__all__ = ["read_body", "image_bytes", "b64_image", "decode", "too_large"]
