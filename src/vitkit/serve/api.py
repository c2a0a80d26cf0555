"""The HTTP API and the web page: FastAPI routes over `Service` (the model side) and `Batcher` (dynamic batching).

Routes: `/v1/classify`, `/v1/explain`, `/v1/embed`, `/v1/search`, `/v1/images/{id}`, `/v1/model`, the KServe v2
inference protocol under `/v2`, `/healthz`, `/readyz`, `/metrics`, and the page at `/`. Every error is JSON
`{"error": kind, "detail": reason}` with its status. With an API key, every route but the health checks and the
static page (which holds no data and runs nothing) needs `Authorization: Bearer KEY`.
"""

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Literal, Optional

import numpy as np

from .. import __version__
from ..errors import CheckpointError, VitkitError
from .batching import Batcher
from .config import ServeConfig
from .errors import ServeError
from .metrics import CONTENT_TYPE, Metrics
from .model import Service
from .uploads import b64_image, decode, image_bytes, read_body

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Swagger UI's own files, served from the fastapi-swagger package so /docs needs no CDN (works offline)
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
               "favicon-32x32.png": "image/png"}
PUBLIC = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/docs", "/openapi.json",
          *(f"/static/{n}" for n in (*STATIC, *DOCS_ASSETS))}
# the page loads nothing from anywhere but this server (no CDN): the browser enforces it
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "description": "the image file's bytes in base64 (or a data: URI)"}}}}}}}
V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
            "data": {"type": "array", "description": "FP32: the preprocessed (B, C, H, W) input, flat; BYTES: "
                     "B base64-encoded image files"}}}}}}}}}}


def _page(name: str) -> bytes:
    return resources.files("vitkit.serve").joinpath("static", name).read_bytes()


def _docs_asset(name: str) -> bytes:
    """One of Swagger UI's files as the fastapi-swagger package ships them (Swagger UI 5: reads OpenAPI 3.1)."""
    return resources.files("fastapi_swagger").joinpath("resources", name).read_bytes()


def create_app(cfg: ServeConfig, service: Optional[Service] = None):
    """A FastAPI app serving `cfg.checkpoint`. The model loads in the background when the app starts (its
    lifespan), so /healthz answers at once and /readyz turns 200 once the model is loaded and warmed up."""
    import anyio
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    svc = service or Service(cfg)
    key = cfg.key()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitkit-model")  # the one model worker
    batchers: dict = {}
    incoming = [0]  # requests reading or decoding their image, not yet queued: the batcher waits only for these
    decoders: list = []  # the decoding limiter (one), made in lifespan: anyio's needs the running loop
    metrics = Metrics(lambda: sum(b.depth() for b in batchers.values()))
    pages = {"index.html": _page("index.html"), **{n: _page(n) for n in STATIC}}

    def batcher(task: str, fn) -> Batcher:
        return Batcher(fn, executor, max_batch=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                       max_queue=cfg.max_queue, on_batch=metrics.batch.labels(task).observe,
                       coming=lambda: incoming[0])

    def then_release(fn):
        def run(xs):
            try:
                return fn(xs)
            finally:
                svc.release_memory()
        return run

    batchers.update(classify=batcher("classify", then_release(lambda xs: svc.classify(xs))),
                    embed=batcher("embed", then_release(lambda xs: svc.embed(xs))),
                    explain=batcher("explain", then_release(lambda items: svc.explain(items))))

    def load() -> None:
        try:
            svc.load()
        except Exception as e:  # noqa: BLE001 - said by /readyz and the log; the process stays up to say it
            svc.error = " ".join(str(e).split()) or type(e).__name__
            log.error("vitkit serve: cannot load %s: %s", cfg.checkpoint, svc.error)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        import torch

        for b in batchers.values():
            b.start()
        decoders[:] = [anyio.CapacityLimiter(max(1, torch.get_num_threads()))]
        loader = None
        if not svc.ready:
            loader = threading.Thread(target=load, name="vitkit-load", daemon=True)
            loader.start()
        try:
            yield
        finally:
            for b in batchers.values():
                await b.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    # /docs is served below from local files (FastAPI's own loads Swagger UI from a CDN); no ReDoc (no package
    # ships its files)
    app = FastAPI(title="vitkit serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None,
                  description="A vitkit classifier over HTTP: classify, explain, embed, search, KServe v2.")
    app.state.service, app.state.metrics, app.state.batchers = svc, metrics, batchers
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error(status: int, kind: str, detail: str, headers=None) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Bearer auth (constant-time compare), then request count and latency by route template."""
        t0 = time.perf_counter()
        path = request.url.path
        if key and path not in PUBLIC and request.method != "OPTIONS":
            got = request.headers.get("authorization", "")
            if not (got[:7].lower() == "bearer " and hmac.compare_digest(got[7:].strip().encode(), key.encode())):
                response = error(401, "unauthorized", "this server needs 'Authorization: Bearer <key>' (the key it "
                                 "was started with: --api-key or $VITKIT_API_KEY)", {"WWW-Authenticate": "Bearer"})
                metrics.requests.labels("auth", "401").inc()
                return response
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(ServeError)
    async def _serve_error(_request, e: ServeError):
        return error(e.status, e.kind, e.detail, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}".strip(": "))

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error(e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(VitkitError)
    async def _vitkit(_request, e: VitkitError):
        bad_model = isinstance(e, CheckpointError)  # NaN outputs: the server's fault, not the request's
        return error(500 if bad_model else 422, "model_error" if bad_model else "invalid_request",
                     " ".join(str(e).split()))

    @app.exception_handler(Exception)
    async def _crash(_request, e: Exception):
        log.exception("vitkit serve: unexpected error")
        return error(500, "internal", f"{type(e).__name__}: the server failed on this request; see its log")

    # ---- helpers ---------------------------------------------------------------------------------------------
    def need_ready() -> None:
        if svc.error:
            raise ServeError(503, "load_failed", f"the model failed to load: {svc.error}")
        if not svc.ready:
            raise ServeError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "1"})

    async def image_input(request: Request):
        """The request's image → the model's input (C, H, W); decoding runs off the event loop, on at most as many
        threads as there are cores, first come first served (dozens of threads decoding at once would starve the
        model worker of CPU and finish in no particular order: a long latency tail). Counted in `incoming` until
        `run` queues it (every caller of image_input calls run next)."""
        need_ready()
        incoming[0] += 1
        try:
            body = await read_body(request, cfg.max_upload_bytes, cfg.body_timeout_s)
            data, _ = image_bytes(body, request.headers.get("content-type"))
            return await anyio.to_thread.run_sync(
                lambda: svc.preprocess(decode(data, svc.channels, cfg.max_pixels)), limiter=decoders[0])
        except BaseException:
            incoming[0] -= 1
            raise

    async def run(task: str, item, counted: bool = True):
        """One item through the task's batcher, or 504 past --timeout; `counted`: it came from image_input."""
        try:
            fut = batchers[task].enqueue(item)
        finally:
            incoming[0] -= counted
        try:
            return await asyncio.wait_for(fut, cfg.timeout_s or None)
        except asyncio.TimeoutError:
            raise ServeError(504, "timeout", f"no answer within {cfg.timeout_s:g} s (--timeout); the server is "
                             "overloaded, retry later", {"Retry-After": "1"}) from None

    # ---- v1 --------------------------------------------------------------------------------------------------
    @app.post("/v1/classify", openapi_extra=IMAGE_BODY, summary="top-k labels and probabilities of an image")
    async def classify(request: Request, topk: int = Query(5, ge=1, le=1000)):
        probs = await run("classify", await image_input(request))
        return svc.topk(probs, topk)

    @app.post("/v1/explain", openapi_extra=IMAGE_BODY, summary="attention map of an image: grid scores and PNGs",
              responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request, method: Literal["rollout", "attention"] = "rollout",
                      head_fusion: Literal["mean", "max", "min"] = "mean",
                      discard_ratio: float = Query(0.0, ge=0.0, lt=1.0),
                      format: Literal["json", "png"] = "json"):
        x = await image_input(request)
        res = await run("explain", (x, (method, head_fusion, float(discard_ratio))))
        png = format == "png" or request.headers.get("accept", "").startswith("image/png")
        doc = await run_in_threadpool(svc.explanation, x, res)
        if png:
            import base64

            return Response(base64.b64decode(doc["overlay_png"]), media_type="image/png")
        return doc

    @app.post("/v1/embed", openapi_extra=IMAGE_BODY, summary="the L2-normalised embedding `vitkit embed` gives")
    async def embed(request: Request):
        v = await run("embed", await image_input(request))
        return {"pool": svc.pool, "layer": svc.layer, "dim": int(v.shape[0]), "embedding": v.tolist()}

    @app.post("/v1/search", openapi_extra=IMAGE_BODY, summary="the k nearest images of the index (--index)")
    async def search(request: Request, k: int = Query(10, ge=1, le=100)):
        need_ready()
        if svc.index is None:
            raise ServeError(404, "no_index", "this server has no index; start it with --index INDEX_DIR")
        v = await run("embed", await image_input(request))
        rows = await run_in_threadpool(svc.neighbours, v[None], k)
        return {"k": k, "neighbours": rows[0]}

    @app.get("/v1/images/{image_id}", summary="an index image by id (a PNG, read-only)",
             responses={200: {"content": {"image/png": {}}}})
    async def image(image_id: int, size: int = Query(256, ge=16, le=1024)):
        need_ready()
        data = await run_in_threadpool(svc.thumbnail, image_id, size)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/model", summary="config, classes, preprocessing, checkpoint sha256, training figures")
    async def model():
        need_ready()
        return svc.info

    # ---- health and metrics ------------------------------------------------------------------------------------
    @app.get("/healthz", summary="live: the process answers")
    async def healthz():
        return {"status": "live"}

    @app.get("/readyz", summary="ready: the model is loaded and warmed up (503 until then)")
    async def readyz():
        if not svc.ready:
            return error(503, "load_failed" if svc.error else "not_ready", svc.error or "the model is loading",
                         {"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    # ---- KServe v2 (open inference protocol), classification -----------------------------------------------------
    def check_name(name: str) -> None:
        need_ready()
        if name != svc.model_name():
            raise ServeError(404, "not_found", f"no model {name!r}; this server serves {svc.model_name()!r}")

    @app.get("/v2", summary="KServe v2 server metadata")
    async def v2_server():
        return {"name": "vitkit", "version": __version__, "extensions": []}

    @app.get("/v2/health/live", summary="KServe v2 liveness")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready", summary="KServe v2 readiness")
    async def v2_ready():
        if not svc.ready:
            return error(503, "not_ready", svc.error or "the model is loading", {"Retry-After": "1"})
        return {"ready": True}

    @app.get("/v2/models/{name}/ready", summary="KServe v2 model readiness")
    async def v2_model_ready(name: str):
        check_name(name)
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}", summary="KServe v2 model metadata")
    async def v2_model(name: str):
        check_name(name)
        c, h, w = svc.input_size
        return {"name": name, "versions": [svc.sha256[:12]], "platform": "pytorch_vitkit",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(svc.names)]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"classes": svc.names, "preprocessing": svc.info["preprocessing"],
                               "bytes_input": "BYTES input: base64-encoded image files, preprocessed by the server"}}

    @app.post("/v2/models/{name}/infer", openapi_extra=V2_BODY, summary="KServe v2 inference: class probabilities")
    async def v2_infer(name: str, request: Request):
        import json

        check_name(name)
        try:
            doc = json.loads(await read_body(request, cfg.max_upload_bytes, cfg.body_timeout_s))
            inp = doc["inputs"][0]
            shape, dtype, data = [int(s) for s in inp["shape"]], inp["datatype"], inp["data"]
        except ServeError:
            raise
        except Exception:  # noqa: BLE001 - any malformed document is the same client error
            raise ServeError(422, "invalid_request", "expected {\"inputs\": [{\"name\", \"shape\", \"datatype\", "
                             "\"data\"}]} (KServe v2)") from None
        xs = await run_in_threadpool(v2_inputs, shape, dtype, data)
        probs = await asyncio.gather(*(run("classify", x, counted=False) for x in xs))
        out = {"model_name": name, "model_version": svc.sha256[:12], "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [len(xs), len(svc.names)],
             "data": np.stack(probs).astype(np.float32).ravel().tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(xs)],
             "data": [svc.names[int(np.argmax(p))] for p in probs]}]}
        if "id" in doc:
            out["id"] = doc["id"]
        return out

    def v2_inputs(shape, dtype, data) -> list:
        """A v2 input tensor → model inputs: FP32 (B, C, H, W) as it is, BYTES as encoded images to preprocess."""
        import torch

        if dtype == "BYTES":
            if len(shape) != 1 or shape[0] != len(data) or not 1 <= len(data) <= cfg.max_batch_size:
                raise ServeError(422, "invalid_request", f"BYTES input: shape [B] with 1 <= B <= "
                                 f"{cfg.max_batch_size} base64 images, got shape {shape} with {len(data)} items")
            return [svc.preprocess(decode(b64_image(d.get("b64") if isinstance(d, dict) else d), svc.channels,
                                          cfg.max_pixels)) for d in data]
        want = list(svc.input_size)
        if dtype != "FP32" or len(shape) != 4 or shape[1:] != want or not 1 <= shape[0] <= cfg.max_batch_size:
            raise ServeError(422, "invalid_request", f"expected FP32 of shape [B, {', '.join(map(str, want))}] with "
                             f"1 <= B <= {cfg.max_batch_size} (or BYTES images), got {dtype} {shape}")
        try:
            x = torch.tensor(np.asarray(data, dtype=np.float32).reshape(shape))
        except ValueError:
            raise ServeError(422, "invalid_request", f"data holds {len(data)} numbers, shape {shape} needs "
                             f"{int(np.prod(shape))}") from None
        if not torch.isfinite(x).all():
            raise ServeError(422, "invalid_request", "the input holds NaN or infinite values")
        return list(x)

    # ---- the page ----------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return Response(pages["index.html"], media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name in DOCS_ASSETS:
            if name not in pages:
                pages[name] = await run_in_threadpool(_docs_asset, name)
            return Response(pages[name], media_type=DOCS_ASSETS[name],
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=86400"})
        if name not in STATIC:  # a fixed set of files: no path from the request is opened
            raise ServeError(404, "not_found", f"no static file {name!r}")
        return Response(pages[name], media_type=STATIC[name], headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        """Swagger UI over /openapi.json, its script, style and icon from this server (no CDN: works offline)."""
        from fastapi.openapi.docs import get_swagger_ui_html

        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - API",
            swagger_js_url=f"{root}/static/swagger-ui-bundle.js", swagger_css_url=f"{root}/static/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None})  # Swagger UI would post the schema to validator.swagger.io

    return app


__all__ = ["create_app", "PUBLIC"]
