"""Every refusal the server promises, each with its status and a one-line JSON reason: oversize bodies (413),
decompression bombs (413), non-images (415), undecodable images (422), wrong or missing auth (401), a full queue
(503 + Retry-After), a slow answer (504), a body sent too slowly (408), a model still loading or failing to load
(503); uploads never touch disk."""
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from .conftest import make_client, wait_ready

PNG = {"content-type": "image/png"}


def _png(arr, mode="L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _noise(h=28, w=28, seed=0) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8))


@pytest.fixture(scope="module")
def limited(served):
    with make_client(checkpoint=str(served[0]), max_upload_bytes=20_000, max_pixels=100_000) as c:
        yield wait_ready(c)


def _refused(r, status, kind):
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["error"] == kind and doc["detail"] and "\n" not in doc["detail"], doc
    return doc


def test_oversize_bodies_are_413_by_length_and_while_streaming(limited):
    big = _noise(200, 200)  # ~40 kB of PNG noise
    assert len(big) > 20_000
    _refused(limited.post("/v1/classify", content=big, headers=PNG), 413, "too_large")
    _refused(limited.post("/v1/classify", files={"file": ("a.png", big, "image/png")}), 413, "too_large")

    def chunks():  # a chunked upload declares no length
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    _refused(limited.post("/v1/classify", content=chunks(), headers=PNG), 413, "too_large")
    assert limited.post("/v1/classify", content=_noise(), headers=PNG).status_code == 200


def test_decompression_bombs_are_413_before_decoding(limited, monkeypatch):
    bomb = _png(np.zeros((1000, 1000), np.uint8))  # a tiny file of 1,000,000 pixels, above the 100,000 cap
    assert len(bomb) < 20_000
    doc = _refused(limited.post("/v1/classify", content=bomb, headers=PNG), 413, "too_many_pixels")
    assert "1000x1000" in doc["detail"]
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # Pillow's own guard fires first: still a 413
    _refused(limited.post("/v1/classify", content=_png(np.zeros((300, 300), np.uint8)), headers=PNG), 413,
             "too_many_pixels")


def test_non_images_and_broken_images(limited):
    _refused(limited.post("/v1/classify", content=b"%PDF-1.4 not an image", headers=PNG), 415, "not_an_image")
    _refused(limited.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"}), 415,
             "unsupported_media_type")
    cut = _noise(60, 60)
    doc = _refused(limited.post("/v1/classify", content=cut[: len(cut) // 2], headers=PNG), 422, "bad_image")
    assert "upload" in doc["detail"] and "truncated" in doc["detail"]
    _refused(limited.post("/v1/classify", json={"image": "not base64!"}), 422, "bad_base64")
    _refused(limited.post("/v1/classify", json={"picture": "x"}), 422, "no_image")
    _refused(limited.post("/v1/classify", content=b"{", headers={"content-type": "application/json"}), 422, "bad_json")
    _refused(limited.post("/v1/classify", content=b"", headers=PNG), 422, "no_image")
    _refused(limited.post("/v1/classify?topk=0", content=_noise(), headers=PNG), 422, "invalid_request")
    _refused(limited.post("/v1/search", content=_noise(), headers=PNG), 404, "no_index")
    _refused(limited.get("/v1/nothing"), 404, "not_found")
    text = limited.get("/metrics").text
    assert 'vitkit_errors_total{kind="not_an_image"} 1.0' in text and 'kind="bad_image"' in text


def test_uploads_never_touch_the_disk(limited, served, monkeypatch):
    """A 1.5 MB multipart upload (Starlette's form parser would spool it to a temporary file) stays in memory."""
    import builtins
    import tempfile

    def no_disk(*a, **k):
        raise AssertionError("an upload went to disk")

    real_open = builtins.open

    def guarded_open(file, mode="r", *a, **k):
        if any(m in mode for m in "wax+"):
            no_disk()
        return real_open(file, mode, *a, **k)

    with make_client(checkpoint=str(served[0])) as c:
        wait_ready(c)
        for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
            monkeypatch.setattr(tempfile, name, no_disk)
        monkeypatch.setattr(builtins, "open", guarded_open)
        big = _png(np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8), "RGB")
        assert len(big) > 1_200_000
        r = c.post("/v1/classify", files={"file": ("big.png", big, "image/png")})
        assert r.status_code == 200, r.text


def test_bearer_auth_for_everything_but_health_and_the_page(served, monkeypatch):
    monkeypatch.setenv("VITKIT_API_KEY", "from-env")
    good, data = {"Authorization": "Bearer s3cret", **PNG}, _noise()
    with make_client(checkpoint=str(served[0]), index=str(served[3]), api_key="s3cret") as c:
        wait_ready(c)
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/static/app.js"):
            assert c.get(path).status_code == 200, path
        for method, path in (("post", "/v1/classify"), ("post", "/v1/explain"), ("post", "/v1/embed"),
                             ("post", "/v1/search"), ("get", "/v1/images/0"), ("get", "/v1/model"),
                             ("get", "/metrics"), ("get", f"/v2/models/{served[0].stem}")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer from-env"}):
                r = getattr(c, method)(path, headers={**PNG, **headers}, **({"content": data} if method == "post"
                                                                               else {}))
                _refused(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/classify", content=data, headers=good).status_code == 200
        assert c.get("/v1/images/0", headers=good).status_code == 200
    with make_client(checkpoint=str(served[0])) as c:  # no --api-key: the environment's key is the key
        wait_ready(c)
        _refused(c.post("/v1/classify", content=data, headers=PNG), 401, "unauthorized")
        assert c.post("/v1/classify", content=data, headers={"Authorization": "Bearer from-env", **PNG}).status_code \
            == 200


def test_a_full_queue_answers_503_with_retry_after_and_recovers(served):
    gate, started = threading.Event(), threading.Event()

    def hold(task, n):  # the model worker blocks on its first batch until the test lets it go
        started.set()
        gate.wait(30)

    extra = {"before_batch": hold}
    with make_client(checkpoint=str(served[0]), max_batch_size=1, max_queue=2, warmup=False, extra=extra) as c:
        wait_ready(c)
        data = _noise()
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(c.post, "/v1/classify", content=data, headers=PNG)
            assert started.wait(30)
            waiting = [pool.submit(c.post, "/v1/classify", content=data, headers=PNG) for _ in range(2)]
            t0 = time.time()
            while c.get("/metrics").text.count("vitkit_queue_depth 2.0") == 0 and time.time() - t0 < 30:
                time.sleep(0.02)
            refused = [c.post("/v1/classify", content=data, headers=PNG) for _ in range(3)]
            for r in refused:
                _refused(r, 503, "queue_full")
                assert r.headers["retry-after"] == "1"
            gate.set()
            assert all(f.result().status_code == 200 for f in [first, *waiting])
        assert c.post("/v1/classify", content=data, headers=PNG).status_code == 200


def test_a_slow_answer_is_504(served):
    extra = {"before_batch": lambda task, n: time.sleep(1.0)}
    with make_client(checkpoint=str(served[0]), timeout_s=0.2, warmup=False, extra=extra) as c:
        wait_ready(c)
        _refused(c.post("/v1/classify", content=_noise(), headers=PNG), 504, "timeout")


async def _asgi_post(app, path: str, chunks: list, delay: float) -> tuple:
    """POST `chunks` as the request body straight into the ASGI app, `delay` seconds before each (a slow client,
    without sockets): (status, JSON answer)."""
    import asyncio
    import json

    sent, answered = [], asyncio.Event()
    chunks = list(chunks)

    async def receive():
        if chunks:
            await asyncio.sleep(delay)
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
             "server": ("testserver", 80), "headers": [(b"host", b"testserver"), (b"content-type", b"image/png")]}
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_body_sent_too_slowly_is_408(served):
    """--body-timeout bounds the upload itself (--timeout only the wait for the model): a client that trickles its
    body is answered 408 instead of holding the connection; one that sends in time is served."""
    data = _noise()
    parts = [data[i:i + 64] for i in range(0, len(data), 64)]
    with make_client(checkpoint=str(served[0]), body_timeout_s=0.5, warmup=False) as c:
        wait_ready(c)
        status, doc = c.portal.call(_asgi_post, c.app, "/v1/classify", parts, 0.2)
        assert (status, doc["error"]) == (408, "body_timeout") and "--body-timeout" in doc["detail"], doc
        status, doc = c.portal.call(_asgi_post, c.app, "/v1/classify", parts, 0.0)
        assert status == 200 and doc["label"], doc
        assert 'vitkit_errors_total{kind="body_timeout"} 1.0' in c.get("/metrics").text


def test_not_ready_until_loaded_and_a_failed_load_says_why(served, tmp_path):
    gate = threading.Event()
    with make_client(checkpoint=str(served[0]), extra={"before_load": lambda: gate.wait(30)}) as c:
        assert c.get("/healthz").status_code == 200
        _refused(c.get("/readyz"), 503, "not_ready")
        assert c.get("/readyz").headers["retry-after"] == "1"
        _refused(c.post("/v1/classify", content=_noise(), headers=PNG), 503, "not_ready")
        _refused(c.get("/v2/health/ready"), 503, "not_ready")
        gate.set()
        wait_ready(c)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with make_client(checkpoint=str(bad)) as c:
        t0 = time.time()
        while c.get("/readyz").json()["error"] == "not_ready" and time.time() - t0 < 30:
            time.sleep(0.05)
        doc = _refused(c.get("/readyz"), 503, "load_failed")
        assert "broken.safetensors" in doc["detail"]
        _refused(c.post("/v1/classify", content=_noise(), headers=PNG), 503, "load_failed")


def test_cors_is_off_unless_an_origin_is_given(served):
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with make_client(checkpoint=str(served[0]), warmup=False) as c:
        wait_ready(c)
        assert "access-control-allow-origin" not in c.options("/v1/classify", headers=pre).headers
    with make_client(checkpoint=str(served[0]), warmup=False, cors_origins=("https://app.example",)) as c:
        wait_ready(c)
        r = c.options("/v1/classify", headers=pre)
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_serve_config_and_cli_flags_are_checked_in_one_line(capsys):
    from vitkit.cli import main
    from vitkit.errors import ConfigError
    from vitkit.serve import ServeConfig

    for bad in ({"max_batch_size": 0}, {"max_queue": -1}, {"max_wait_ms": float("nan")}, {"api_key": " "},
                {"body_timeout_s": -1}):
        with pytest.raises(ConfigError):
            ServeConfig("x", **bad)
    assert main(["serve", "x", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit: error: --max-batch-size must be an integer >= 1") and err.count("\n") == 1
