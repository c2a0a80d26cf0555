"""What `vitkit serve` is started with: one frozen dataclass, checked when made, so a bad flag fails in one line
before any model loads."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..errors import ConfigError

API_KEY_ENV = "VITKIT_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """The served checkpoint (file or run folder), an optional index for search, and the server's limits."""

    checkpoint: str
    index: Optional[str] = None
    device: str = "auto"
    fast: bool = True                    # vitkit.optimize for classify and embed (explain needs the plain model)
    precision: str = "auto"              # the fast path's precision; auto: measured at max_batch_size at load
    calibration: Optional[str] = None    # a folder of images auto checks agreement on (else the index's, else
                                         # synthetic images)
    max_batch_size: int = 32             # images per forward
    max_wait_ms: float = 5.0             # how long the first request of a batch waits for company
    max_queue: int = 256                 # waiting requests past which the server answers 503 + Retry-After
    max_upload_bytes: int = 10 * 2**20   # request bodies above this are refused with 413
    max_pixels: int = 40_000_000         # decoded image size cap (the decompression-bomb guard): 413
    timeout_s: float = 30.0              # a request still unanswered after this gets 504
    body_timeout_s: float = 60.0         # a request body not fully received after this gets 408 (0: no limit)
    api_key: Optional[str] = None        # bearer token for every route but the health checks (and the static page)
    cors_origins: Tuple[str, ...] = ()   # CORS stays off unless origins are given
    name: Optional[str] = None           # the model's name in the KServe v2 routes (default: the checkpoint's stem)
    warmup: bool = True                  # one forward at batch 1 and at max_batch_size before /readyz says ready
    extra: dict = field(default_factory=dict, compare=False)  # test hooks; not set by the CLI

    def __post_init__(self) -> None:
        for name, lo in (("max_batch_size", 1), ("max_queue", 1), ("max_upload_bytes", 1), ("max_pixels", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}", field=name)
        for name in ("max_wait_ms", "timeout_s", "body_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}", field=name)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; give a non-empty key, or none to turn auth off", field="api_key")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins or ()))
        if self.precision not in ("auto", "fp32", "bf16", "int8"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or int8, got {self.precision!r}", field="precision")

    def key(self) -> Optional[str]:
        """The bearer token: api_key, else $VITKIT_API_KEY, else None (no auth)."""
        return self.api_key or os.environ.get(API_KEY_ENV) or None
