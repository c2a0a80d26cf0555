"""`vitkit serve`: a trained classifier over HTTP — a JSON API with dynamic batching (classify, explain, embed,
search), the KServe v2 inference protocol, Prometheus metrics, health checks and a web page, on FastAPI + uvicorn.

    from vitkit.serve import ServeConfig, app
    asgi = app(ServeConfig("runs/demo", index="index/"))   # mount it in another ASGI app, or:
    serve(ServeConfig("runs/demo"), port=8000)              # what `vitkit serve` runs

Needs the `serve` extra: pip install 'vitkit[serve]'.
"""
from __future__ import annotations

from .config import API_KEY_ENV, ServeConfig
from .errors import QueueFull, ServeError


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import fastapi_swagger  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
    except ImportError as e:
        raise ImportError(f"vitkit serve needs FastAPI, fastapi-swagger, python-multipart and prometheus-client "
                          f"({e.name} is missing); install them with: pip install 'vitkit[serve]'") from None


def app(config: ServeConfig):
    """An ASGI app (FastAPI) serving `config.checkpoint`; the model loads when the app starts."""
    _require()
    from .api import create_app

    return create_app(config)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (one process: the batching worker owns the model)."""
    _require()
    try:
        import uvicorn
    except ImportError:
        raise ImportError("vitkit serve needs uvicorn; install it with: pip install 'vitkit[serve]'") from None
    # asyncio's loop and h11 even where uvloop and httptools are installed (uvicorn would take them): with both,
    # ViT-S/16 at 32 clients measured 28.0-28.3 req/s and 60.7 ms CPU per request against 31.8-31.9 and 54.8
    # without (benchmarks/serve.py, interleaved pairs, docs/serve.md): their loop competes with the model's threads
    uvicorn.run(app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                loop="asyncio", http="h11")


__all__ = ["ServeConfig", "ServeError", "QueueFull", "API_KEY_ENV", "app", "serve"]
