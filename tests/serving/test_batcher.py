"""The continuous batcher: a lone request runs at once, requests that queue during a batch form the next one, errors
reach every caller of their batch, and the worker is one thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.batcher import Batcher, BatchTiming


def _doubler(delay_s: float, seen: list[list[int]], threads: set[int] | None = None):
    def run(items: list[int]) -> list[int]:
        seen.append(list(items))
        if threads is not None:
            threads.add(threading.get_ident())
        time.sleep(delay_s)
        return [2 * item for item in items]

    return run


def test_a_lone_request_does_not_wait_for_company() -> None:
    async def main() -> float:
        batcher = Batcher(_doubler(0.0, []), max_batch_size=8)
        started = time.perf_counter()
        assert await batcher.submit(21) == 42
        batcher.close()
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.05


def test_requests_that_queue_during_a_batch_form_the_next_one() -> None:
    seen: list[list[int]] = []
    timings: list[BatchTiming] = []

    async def main() -> list[int]:
        batcher = Batcher(_doubler(0.1, seen), max_batch_size=4, on_batch=timings.append)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.02)  # the first batch (one item) is running now
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
        results = await asyncio.gather(first, *rest)
        batcher.close()
        return results

    assert asyncio.run(main()) == [0, 2, 4, 6, 8, 10, 12]
    assert seen == [[0], [1, 2, 3, 4], [5, 6]], "full batches from what queued, in arrival order"
    assert [t.size for t in timings] == [1, 4, 2]
    assert timings[1].queued_s >= 0.05, "the second batch waited for the first one"


def test_max_wait_lets_a_batch_gather_company() -> None:
    seen: list[list[int]] = []

    async def main() -> None:
        batcher = Batcher(_doubler(0.0, seen), max_batch_size=3, max_wait_s=0.2)

        async def late(item: int, delay: float) -> int:
            await asyncio.sleep(delay)
            return await batcher.submit(item)

        started = time.perf_counter()
        await asyncio.gather(late(1, 0.0), late(2, 0.03), late(3, 0.06))
        assert time.perf_counter() - started < 0.18, "a full batch goes before the wait is over"
        batcher.close()

    asyncio.run(main())
    assert seen == [[1, 2, 3]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if 13 in items:
            raise ValueError("unlucky batch")
        return items

    async def main() -> None:
        batcher = Batcher(run, max_batch_size=8)
        outcomes = await asyncio.gather(batcher.submit(13), return_exceptions=True)
        assert isinstance(outcomes[0], ValueError)
        assert await batcher.submit(7) == 7
        batcher.close()

    asyncio.run(main())
    assert calls == [[13], [7]]


def test_every_batch_and_warm_up_runs_on_one_worker_thread() -> None:
    threads: set[int] = set()

    async def main() -> None:
        batcher = Batcher(_doubler(0.01, [], threads), max_batch_size=2)
        await asyncio.gather(*(batcher.submit(i) for i in range(9)))
        threads.add(await batcher.on_worker(threading.get_ident))
        batcher.close()

    asyncio.run(main())
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_cancelled_caller_is_dropped_before_its_batch_runs() -> None:
    seen: list[list[int]] = []

    async def main() -> None:
        batcher = Batcher(_doubler(0.05, seen), max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert await first == 2 and await kept == 6
        batcher.close()

    asyncio.run(main())
    assert seen == [[1], [3]]


def test_max_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(lambda items: items, max_batch_size=0)


def test_a_coroutine_runs_on_the_loop_with_several_batches_in_flight() -> None:
    calls: list[list[int]] = []
    in_flight, peak = 0, 0

    async def send(items: list[int]) -> list[int]:
        nonlocal in_flight, peak
        calls.append(list(items))
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return [item + 100 for item in items]

    async def main() -> list[int]:
        batcher = Batcher(send, max_batch_size=3, max_in_flight=2)
        first = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 9)]
        results = await asyncio.gather(*first, *rest)
        batcher.close()
        return results

    assert asyncio.run(main()) == [100 + i for i in range(9)]
    assert peak == 2, "two calls at once, no more"
    assert calls[0] == [0, 1] and all(len(call) <= 3 for call in calls) and sum(map(len, calls)) == 9


def test_a_thread_worker_takes_one_batch_at_a_time() -> None:
    with pytest.raises(ValueError, match="one batch at a time"):
        Batcher(lambda items: items, max_batch_size=4, max_in_flight=2)
