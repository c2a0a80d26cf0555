"""The server's one error type: an HTTP status, a short machine-readable kind, and a one-line reason, answered as
JSON `{"error": kind, "detail": reason}`."""
from __future__ import annotations

from typing import Dict, Optional


class ServeError(Exception):
    """A request the server refuses: `status` (413, 415, 422, 503, ...), `kind` (e.g. "too_large"), `detail`."""

    def __init__(self, status: int, kind: str, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, dict(headers or {})


class QueueFull(ServeError):
    """The batching queue is at --max-queue: the client should retry later instead of the server growing memory."""

    def __init__(self, depth: int, retry_after: int = 1):
        super().__init__(503, "queue_full", f"{depth} requests are already waiting (--max-queue); retry in "
                         f"{retry_after} s", {"Retry-After": str(retry_after)})
