"""Continuous batching: single requests in, batches out, each answer back to its caller.

Why not `@serve.batch`: it forms the next batch on its own timer while the current one runs, so under load the
requests that queue during one forward pass are cut into several small batches instead of one full one, and it wants
the forward pass on the replica's event loop, which in Serve's throughput-optimized mode also runs the gRPC server,
the HTTP server and the health checks. Here a batch takes everything queued (up to `max_batch_size`) the moment a
slot is free: a lone request never waits for company, and under load each batch holds what arrived meanwhile.

Two kinds of work: a plain function runs on one worker thread (the detector's forward pass: a GPU's execution plans
and CUDA graphs belong to one thread, and a CPU forward already uses every core); a coroutine function runs on the
event loop with up to `max_in_flight` batches at once (the ingress sending crops to the detector in one call, where
the cost is per call, not per crop).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchTiming:
    """What one batch cost, for metrics: its size, how long its oldest request queued, and its run time."""

    size: int
    queued_s: float
    run_s: float


class Batcher(Generic[Item, Result]):
    """Runs ``run(items) -> results`` (same length, same order) over batches of submitted items.

    ``max_wait_s`` lets a batch that is not full wait that long for more items once a slot is free; 0 (the default)
    never waits. ``on_batch`` is called on the event loop after each batch (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Sequence[Result]] | Callable[[list[Item]], Any],
        *,
        max_batch_size: int,
        max_wait_s: float = 0.0,
        max_in_flight: int = 1,
        on_batch: Callable[[BatchTiming], None] | None = None,
        name: str = "aipd-batch",
    ) -> None:
        if max_batch_size < 1 or max_in_flight < 1:
            raise ValueError(
                f"max_batch_size and max_in_flight must be at least 1, got {max_batch_size}, {max_in_flight}"
            )
        self._run = run
        self._is_async = inspect.iscoroutinefunction(run)
        if not self._is_async and max_in_flight != 1:
            raise ValueError("a function run on the worker thread takes one batch at a time (max_in_flight=1)")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: collections.deque[tuple[Item, asyncio.Future, float]] = collections.deque()
        self._slots: asyncio.Semaphore | None = None
        self._max_in_flight = max_in_flight
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
            self._slots = asyncio.Semaphore(self._max_in_flight)
            self._task = loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._arrived is not None and self._slots is not None
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()  # the queue keeps filling while every slot is busy
            if self.max_wait_s > 0 and len(self._queue) < self.max_batch_size:
                await self._linger()
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            batch = [entry for entry in batch if not entry[1].done()]  # callers that gave up (a disconnect)
            if not batch:
                self._slots.release()
                continue
            if self._is_async:
                asyncio.get_running_loop().create_task(self._run_batch(batch))
            else:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future, float]]) -> None:
        assert self._slots is not None
        started = time.perf_counter()
        items = [item for item, _, _ in batch]
        try:
            if self._is_async:
                results = await self._run(items)
            else:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, items)
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(batch)} items")
        except Exception as err:  # noqa: BLE001 - one failed batch fails its callers, not the batcher
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(err)
            return
        finally:
            self._slots.release()
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
