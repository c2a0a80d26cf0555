"""Dynamic batching: concurrent requests wait in a bounded queue, and one worker runs them through the model
together. The first request of a batch waits at most `max_wait_ms` for others, and only while others are on their
way (`coming()`: requests still being read or decoded), so a lone request runs at once instead of paying the wait;
under load batches fill at once.
The model runs on one thread off the event loop, so the server keeps answering (health checks, queueing) while a
batch computes; a full queue is refused (QueueFull → 503 + Retry-After) instead of growing memory."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, Callable, List, Optional, Sequence

from .errors import QueueFull

log = logging.getLogger(__name__)


class Batcher:
    """`await submit(item)` → `fn([items])[i]`, with items of concurrent calls batched. `fn` runs in `executor`
    (share one single-thread executor between batchers: one model worker); `on_batch(n)` observes batch sizes;
    `coming()` counts requests that will be submitted soon (None: always assume some, i.e. always wait)."""

    def __init__(self, fn: Callable[[List[Any]], Sequence[Any]], executor: Executor, *, max_batch: int,
                 max_wait_ms: float, max_queue: int, on_batch: Optional[Callable[[int], None]] = None,
                 coming: Optional[Callable[[], int]] = None):
        self.fn, self.executor, self.on_batch = fn, executor, on_batch
        self.coming = coming or (lambda: 1)
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Create the queue and the worker task on the running event loop."""
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def enqueue(self, item: Any) -> asyncio.Future:
        """Queue `item` now (no await between the call and the queue); its future gets the result. QueueFull when
        --max-queue requests already wait. Cancelling the future (a timeout) drops the item if not yet computed."""
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, fut))
        except asyncio.QueueFull:
            raise QueueFull(self.max_queue) from None
        return fut

    async def submit(self, item: Any) -> Any:
        """The result for `item`, computed in a batch; QueueFull when --max-queue requests already wait."""
        return await self.enqueue(item)

    async def _collect(self) -> list:
        """The next batch: the first waiting request, then others until max_batch, or max_wait has passed, or none
        is on its way (checked every millisecond: a request that fails to decode never arrives)."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0 or self.coming() <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), min(left, 0.001)))
            except asyncio.TimeoutError:
                continue
        return [(x, f) for x, f in batch if not f.done()]  # a request that timed out or left is not computed

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                outs = await loop.run_in_executor(self.executor, self.fn, [x for x, _ in batch])
            except Exception as e:  # noqa: BLE001 - the batch's requests each get the error
                log.debug("batch of %d failed: %s", len(batch), e)
                outs = [e] * len(batch)
            for (_, fut), out in zip(batch, outs):
                if fut.done():
                    continue
                if isinstance(out, BaseException):
                    fut.set_exception(out)
                else:
                    fut.set_result(out)
