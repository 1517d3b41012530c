"""API keys and rate limits: who may call the prediction routes, and how often.

A limit is only fair per identity a client cannot forge. An API key is one; a client's address is one only where
the data path carries it from the client's own connection. Behind Serve's HAProxy ingress (the default data path)
it does not: HAProxy adds no X-Forwarded-For, every request reaches the replica from HAProxy's own address, and a
header the client writes itself would pick it a fresh bucket at will. So there, without keys, nobody is limited
(the service says so once at start) rather than everyone sharing one bucket that a single client's burst empties;
with Serve's own proxy (`serve.high_throughput: false`) the peer address the proxy saw is the identity, and
uvicorn is told to trust no X-Forwarded-For (`FORWARDED_ALLOW_IPS` is empty on clusters this project starts).

Rate-limit state lives in each ingress replica's memory: with N ingress replicas a client can get up to N times its
limit when the proxy spreads its requests. That is the usual trade for a limiter with no shared store on the request
path (a shared Redis or a Ray actor would add a network hop to every request); for a hard global limit put one in
front of Serve (an API gateway) or run a single ingress replica.
"""

from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass

from app.contract import API_KEY_HEADER, ApiError


def check_api_key(keys: list[str], presented: str | None) -> str | None:
    """The key that matched (the rate-limit identity), or None when keys are off; raises 401 otherwise.

    Every configured key is compared in constant time, so timing does not reveal how much of a guess was right.
    """
    if not keys:
        return None
    if not presented:
        raise ApiError(401, "unauthorized", f"missing {API_KEY_HEADER} header; this service requires an API key")
    matched = None
    for key in keys:
        if hmac.compare_digest(key.encode(), presented.encode()):
            matched = key
    if matched is None:
        raise ApiError(401, "unauthorized", f"invalid API key in {API_KEY_HEADER}")
    return matched


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: `per_minute` requests a minute on average, bursts up to `per_minute` at once."""

    MAX_CLIENTS = 100_000  # beyond this, full (idle) buckets are forgotten so memory stays bounded

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def acquire(self, client: str | None) -> None:
        """Take one token for `client` or raise 429 with Retry-After (whole seconds until the next token); a request
        with no identity is not limited."""
        if not self.enabled or client is None:
            return
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.MAX_CLIENTS:
                self._forget_idle(now)
            bucket = self._buckets[client] = _Bucket(self.capacity, now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        wait = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
        raise ApiError(
            429,
            "rate_limited",
            f"more than {self.per_minute} requests a minute from this client; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def _forget_idle(self, now: float) -> None:
        full_after = self.capacity / self.rate if self.rate > 0 else 0.0
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < full_after}


def client_identity(api_key: str | None, client_host: str | None, *, addresses_trusted: bool) -> str | None:
    """Whom a request's rate limit counts against: its API key (a key shared by a fleet is one client), else its
    address where the data path carries a trustworthy one; None: nobody to count against, so no limit."""
    if api_key:
        return "key:" + api_key
    if addresses_trusted and client_host:
        return "ip:" + client_host
    return None


def addresses_trusted() -> bool:
    """Whether this replica sees its clients' own addresses: not behind Serve's HAProxy ingress, which connects to the
    replica itself. Read from Serve's own switch in the replica's process, so it holds for any cluster."""
    from ray.serve._private import constants

    return not getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False)
