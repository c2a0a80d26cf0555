"""Fixtures for the serve tests: the tiny digit classifier (tests/conftest.py), a folder of held-out
digits indexed with `vitkit embed` + `vitkit index build`, and apps over them driven through FastAPI's TestClient
(httpx on the ASGI app, lifespan included)."""
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
pytest.importorskip("python_multipart")

from tasks._digits import mnist5k, write_digits  # noqa: E402


@pytest.fixture(scope="session")
def served(digits_model, tmp_path_factory):
    """(checkpoint, digit folder, the files, index folder, embeddings file): 40 held-out digits, embedded and
    indexed by the library functions `vitkit embed` and `vitkit index build` call."""
    from vitkit.tasks.retrieve import Embeddings, build_index, embed_folder

    root = tmp_path_factory.mktemp("served")
    _, (x, y) = mnist5k()
    files = write_digits(root / "digits", x[:40], y[:40])
    emb = root / "emb.safetensors"
    embed_folder(digits_model, root / "digits", emb, progress=False)
    build_index(Embeddings.load(emb), "flat").save(root / "index")
    return digits_model, root / "digits", files, root / "index", emb


def wait_ready(client, timeout=60.0):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if client.get("/readyz").status_code == 200:
            return client
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/readyz').json()}")


def make_client(**kw):
    """A TestClient over `vitkit.serve.app(ServeConfig(**kw))` (fast=False: the tests compare with the plain
    path `vitkit predict` takes by default); use it as a context manager."""
    from fastapi.testclient import TestClient

    from vitkit.serve import ServeConfig, app

    kw.setdefault("fast", False)
    return TestClient(app(ServeConfig(**kw)))


@pytest.fixture(scope="module")
def client(served):
    ckpt, _, _, index, _ = served
    with make_client(checkpoint=str(ckpt), index=str(index)) as c:
        yield wait_ready(c)
