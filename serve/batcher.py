"""Dynamic batching across concurrent requests, with the next batch formed when the model is free.

Ray Serve's `@serve.batch` (2.60; since batches may run concurrently, ray-project/ray#53096) forms a batch
every `batch_wait_timeout_s` from whatever has arrived and queues it on a semaphore, without waiting for the
previous batch to finish. When a forward pass takes longer than that window (always, for an LLM), the queue
fills with batches of one or two texts that then run one after another: with 32 clients waiting, 1.7 texts per
pass on a 30-layer tiny model here, and on an H100 batched serving only 1.37x unbatched (4.24x with this
batcher; docs/benchmarks.md). Here one loop takes everything that is waiting (up to max_batch_size) at the
moment the previous batch returns, so the batch grows with the load: an idle server answers a lone request
after `wait_s`, a busy one runs full batches back to back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Waiting(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    enqueued: float  # perf_counter at submit


class Batcher(Generic[Item, Result]):
    """submit(item) -> its result, computed by run_batch(items) together with other waiting items.

    run_batch must return one result per item, in order; an exception it raises is every item's exception.
    The loop runs on the event loop of the first submit (a Serve replica's) and survives failed batches.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result]]],
        max_batch_size: int,
        wait_s: float,
        on_batch: Callable[[list[float]], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must not be negative, got {wait_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._on_batch = on_batch  # called with each batch's queue times (seconds), for metrics
        self._queue: asyncio.Queue[_Waiting[Item, Result]] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._serve_batches())
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(item, future, time.perf_counter()))
        return await future

    async def _serve_batches(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._collect(self._queue)
            batch = [waiting for waiting in batch if not waiting.future.cancelled()]  # the client went away
            if not batch:
                continue
            try:  # whatever fails here fails this batch's requests, never the loop (they would wait forever)
                if self._on_batch:
                    started = time.perf_counter()
                    self._on_batch([started - waiting.enqueued for waiting in batch])
                results = await self._run_batch([waiting.item for waiting in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as err:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(err)
                continue
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)

    async def _collect(self, queue: asyncio.Queue[_Waiting[Item, Result]]) -> list[_Waiting[Item, Result]]:
        """The first waiting item, then whatever else arrives within wait_s of it, up to max_batch_size.

        Under load the queue already holds a full batch when the previous one returns, and this returns at once.
        """
        batch = [await queue.get()]
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.max_batch_size:
            if queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            else:
                batch.append(queue.get_nowait())
        return batch
