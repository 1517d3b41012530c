"""Answers to photos the service has seen, by content: the same bytes scored by the same model version again cost
a lookup instead of a decode and a forward pass.

Marketplaces see the same photo over and over (one listing photo on several listings, re-uploads, retries). The key
is the SHA-256 of the uploaded bytes and the model version that answered, so a new champion (or challenger) never
hands out another version's verdict. Two stores: an in-process LRU per ingress replica (the default, bounded in
entries and bytes), or a Redis server every replica shares (`serve.cache_url`). Redis is an optimisation, never a
dependency of an answer: a slow or dead Redis costs a miss within a bounded timeout, and after a few failures in a
row the cache stops asking it for a while (a circuit breaker) instead of adding that timeout to every request.
Grad-CAM explanations are not cached: they are asked for one photo at a time, by a person.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from typing import Any, Protocol

from app.logging import get_logger

KEY_PREFIX = "aipd:answer:"

log = get_logger("serving.cache")


def content_key(digest: str, model_version: str) -> str:
    """The key of an answer: the version that gave it and the SHA-256 of the bytes it answered."""
    return f"{KEY_PREFIX}{model_version}:{digest}"


class AnswerCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, answer: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """A least-recently-used map bounded by entries and by the bytes of the answers' JSON."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> dict[str, Any] | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return dict(item[0])

    async def put(self, key: str, answer: dict[str, Any]) -> None:
        size = len(key) + len(json.dumps(answer))
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        if key in self._items:
            self._bytes -= self._items.pop(key)[1]
        self._items[key] = (dict(answer), size)
        self._bytes += size
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self._bytes -= evicted

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class RedisCache:
    """A shared cache in Redis, asked with a short timeout; `failures` errors in a row open the breaker, and for
    `cooldown_s` every lookup is a miss without a network call."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        timeout_s: float = 0.05,
        failures: int = 3,
        cooldown_s: float = 5.0,
        clock: Any = time.monotonic,
    ) -> None:
        import redis.asyncio as redis

        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0
        )
        self._url, self._ttl_s = url, ttl_s
        self._failures, self._cooldown_s, self._clock = failures, cooldown_s, clock
        self._errors_in_a_row = 0
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        """Whether the breaker is open: Redis is skipped until the cooldown ends."""
        return self._clock() < self._open_until

    async def get(self, key: str) -> dict[str, Any] | None:
        if self.open:
            return None
        try:
            value = await self._client.get(key)
        except Exception as err:  # noqa: BLE001 - any Redis failure is a miss, never a failed request
            self._failed(err)
            return None
        self._errors_in_a_row = 0
        return None if value is None else json.loads(value)

    async def put(self, key: str, answer: dict[str, Any]) -> None:
        if self.open:
            return
        try:
            await self._client.set(key, json.dumps(answer), ex=self._ttl_s)
        except Exception as err:  # noqa: BLE001 - a store that failed only costs the next request a miss
            self._failed(err)
            return
        self._errors_in_a_row = 0

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a connection to a dead server
            await self._client.aclose()

    def _failed(self, err: Exception) -> None:
        self._errors_in_a_row += 1
        if self._errors_in_a_row >= self._failures and not self.open:
            self._open_until = self._clock() + self._cooldown_s
            log.warning("answer cache unreachable; answering without it for a while", url=self._url, error=str(err))


def build_cache(url: str | None, *, max_entries: int, max_bytes: int, ttl_s: int) -> AnswerCache | None:
    """The cache the serve settings ask for: Redis at `url`, else the in-process LRU; None when it is off."""
    if url:
        return RedisCache(url, ttl_s=ttl_s)
    if max_entries <= 0:
        return None
    return MemoryCache(max_entries, max_bytes)
