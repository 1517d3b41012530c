"""Continuous batching: single requests in, batches on one worker thread, each answer back to its caller.

Why not `@serve.batch`: it forms the next batch on its own timer while the current one runs, so under load the
requests that queue during one forward pass are cut into several small batches instead of one full one, and it wants
the forward pass on the replica's event loop, which in Serve's throughput-optimized mode also runs the gRPC server,
the HTTP server and the health checks. Here the worker thread takes everything queued (up to `max_batch_size`) the
moment it is free: a lone request never waits for company, and under load each batch holds what arrived during the
previous one. The event loop only queues and answers, so it stays free to receive.

One worker thread per batcher on purpose: a GPU's execution plans and CUDA graphs are per thread and per stream, and
a CPU forward already uses every core.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchTiming:
    """What one batch cost, for metrics and for each answer's timing: how long its oldest request queued, its size,
    and the worker's time on it."""

    size: int
    queued_s: float
    run_s: float


class Batcher(Generic[Item, Result]):
    """Runs ``run(items) -> results`` (same length, same order) on one worker thread over batches of submitted items.

    ``max_wait_s`` lets a batch that is not full wait that long for more items once the worker is free; 0 (the
    default) never waits. ``on_batch`` is called on the event loop after each batch (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Result]],
        *,
        max_batch_size: int,
        max_wait_s: float = 0.0,
        on_batch: Callable[[BatchTiming], None] | None = None,
        name: str = "aipd-batch",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: collections.deque[tuple[Item, asyncio.Future, float]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        """Queue one item and wait for its result; an exception of ``run`` is raised to every caller of its batch."""
        loop = asyncio.get_running_loop()
        self._start(loop)
        future = loop.create_future()
        self._queue.append((item, future, time.perf_counter()))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    async def on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the worker thread, between batches (warm-ups that must happen on the serving thread)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def call_on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The same from a plain thread (the model keeper): blocks until ``fn`` has run on the worker."""
        return self._executor.submit(fn, *args).result()

    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_wait_s > 0 and len(self._queue) < self.max_batch_size:
                await self._linger()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            batch = [entry for entry in batch if not entry[1].done()]  # callers that gave up (a disconnect)
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run, [item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} items")
            except Exception as err:  # noqa: BLE001 - one failed batch fails its callers, not the batcher
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(BatchTiming(len(batch), started - batch[0][2], time.perf_counter() - started))

    async def _linger(self) -> None:
        assert self._arrived is not None
        deadline = time.perf_counter() + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return
