"""The dynamic batcher on its own (no model, no HTTP): what it batches, when it waits, what it refuses."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from vitkit.serve.batching import Batcher
from vitkit.serve.errors import QueueFull


def _run(coro):
    return asyncio.run(coro)


async def _with(batcher: Batcher, body):
    batcher.start()
    try:
        return await body()
    finally:
        await batcher.stop()


def _recorder(sizes: list, fail_on=None):
    def fn(items):
        sizes.append(len(items))
        if fail_on is not None and fail_on in items:
            raise ValueError("bad item")
        return [x * 10 for x in items]
    return fn


def test_concurrent_requests_are_batched_and_answered_in_order():
    sizes: list = []
    b = Batcher(_recorder(sizes), ThreadPoolExecutor(1), max_batch=8, max_wait_ms=200, max_queue=64)

    async def body():
        return await asyncio.gather(*(b.submit(i) for i in range(5)))

    assert _run(_with(b, body)) == [0, 10, 20, 30, 40]
    assert sizes == [5]  # queued in the same loop step: one forward


def test_max_batch_splits_a_burst():
    sizes: list = []
    b = Batcher(_recorder(sizes), ThreadPoolExecutor(1), max_batch=3, max_wait_ms=50, max_queue=64)

    async def body():
        return await asyncio.gather(*(b.submit(i) for i in range(7)))

    assert _run(_with(b, body)) == [i * 10 for i in range(7)]
    assert sizes == [3, 3, 1]


def test_a_lone_request_does_not_wait_when_nothing_is_coming():
    """With coming() == 0 the first request runs at once; with the old rule it would wait max_wait (here 60 s,
    so the 10 s bound below can only be met by not waiting)."""
    sizes: list = []
    b = Batcher(_recorder(sizes), ThreadPoolExecutor(1), max_batch=8, max_wait_ms=60_000, max_queue=8,
                coming=lambda: 0)

    async def body():
        return await asyncio.wait_for(b.submit(4), 10)

    assert _run(_with(b, body)) == 40 and sizes == [1]


def test_waits_for_a_request_that_is_on_its_way():
    """coming() > 0: the first request waits (up to max_wait) for the one still decoding, and both run together."""
    sizes: list = []
    pending = [1]
    b = Batcher(_recorder(sizes), ThreadPoolExecutor(1), max_batch=8, max_wait_ms=60_000, max_queue=8,
                coming=lambda: pending[0])

    async def late():
        await asyncio.sleep(0.05)  # "decoding"
        fut = b.enqueue(2)
        pending[0] -= 1
        return await fut

    async def body():
        return await asyncio.wait_for(asyncio.gather(b.submit(1), late()), 10)

    assert _run(_with(b, body)) == [10, 20] and sizes == [2]


def test_stops_waiting_when_the_expected_request_never_arrives():
    """A request counted as coming that fails to decode (count drops, nothing queued) does not hold the batch
    until max_wait."""
    sizes: list = []
    pending = [1]
    b = Batcher(_recorder(sizes), ThreadPoolExecutor(1), max_batch=8, max_wait_ms=60_000, max_queue=8,
                coming=lambda: pending[0])

    async def fails_to_decode():
        await asyncio.sleep(0.05)
        pending[0] -= 1

    async def body():
        out = await asyncio.wait_for(asyncio.gather(b.submit(3), fails_to_decode()), 10)
        return out[0]

    assert _run(_with(b, body)) == 30 and sizes == [1]


def test_full_queue_is_refused():
    gate = asyncio.Event()

    async def body():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def slow(items):
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
            return items

        b = Batcher(slow, ThreadPoolExecutor(1), max_batch=1, max_wait_ms=0, max_queue=2)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(0))
            await started.wait()  # the worker holds item 0; the queue is empty again
            queued = [b.enqueue(1), b.enqueue(2)]
            with pytest.raises(QueueFull):
                b.enqueue(3)
            gate.set()
            return await asyncio.gather(first, *queued)
        finally:
            gate.set()
            await b.stop()

    assert _run(body()) == [0, 1, 2]


def test_a_failing_batch_fails_each_of_its_requests():
    sizes: list = []
    b = Batcher(_recorder(sizes, fail_on=2), ThreadPoolExecutor(1), max_batch=8, max_wait_ms=100, max_queue=8)

    async def body():
        return await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)

    out = _run(_with(b, body))
    assert all(isinstance(o, ValueError) for o in out)


def test_a_cancelled_request_is_not_computed():
    seen: list = []

    def fn(items):
        seen.extend(items)
        return items

    b = Batcher(fn, ThreadPoolExecutor(1), max_batch=8, max_wait_ms=0, max_queue=8)

    async def body():
        b.start()
        try:
            gone = b.enqueue("gone")  # queued before the worker's first look
            gone.cancel()             # e.g. its --timeout passed
            return await b.submit("kept")
        finally:
            await b.stop()

    assert _run(body()) == "kept" and seen == ["kept"]
