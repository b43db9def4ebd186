"""Limits an operator sets and a tenant cannot exceed: one key (or one tenant) must not starve
the others on a shared API and serving tier.

- Requests per second per API key, over every route.
- Answer tokens per minute per API key: ``max_tokens`` times ``n``, counted when the request
  arrives (what it may cost, before it costs it).
- Generations in flight per tenant, in this process: more are refused, not queued behind the
  others' requests.

The counting is the ``limits`` library's sliding window counter, in Redis when
``TUNELOOP_REDIS_URL`` is set (every API process shares the counts; if Redis fails, requests are
served unlimited and the log says so) or in this process's memory. A limit of 0 turns it off.
A refusal is
:class:`~core.errors.RateLimited`: 429 ``rate_limit_exceeded`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from core.errors import InvalidInput, RateLimited
from core.settings import ApiSettings

log = logging.getLogger(__name__)


class Limits:
    def __init__(
        self,
        *,
        requests_per_second: float | None,
        tokens_per_minute: int | None,
        max_in_flight: int | None,
        redis_url: str | None = None,
    ) -> None:
        storage: Storage = (
            RedisStorage(
                f"async+{redis_url}",
                implementation="redispy",
                key_prefix="tuneloop",
                wrap_exceptions=True,
            )
            if redis_url
            else MemoryStorage()
        )
        # The sliding window counter: two counters per key and window, O(1) per hit whatever the
        # cost (a moving window keeps one entry per token counted).
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        # "20 per second" and fractions ("0.5/s": 1 per 2 seconds) as whole requests per window.
        self._requests: RateLimitItem | None = None
        if requests_per_second:
            if requests_per_second >= 1:
                self._requests = RateLimitItemPerSecond(int(requests_per_second))
            else:
                self._requests = RateLimitItemPerSecond(1, round(1 / requests_per_second))
        self._tokens = RateLimitItemPerMinute(tokens_per_minute) if tokens_per_minute else None
        self.max_in_flight = max_in_flight or None
        self._in_flight: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> Limits:
        return cls(
            requests_per_second=settings.rate_limit_rps,
            tokens_per_minute=settings.rate_limit_tokens_per_minute,
            max_in_flight=settings.max_in_flight_per_tenant,
            redis_url=settings.redis_url,
        )

    async def _hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        try:
            return await self._limiter.hit(item, *identifiers, cost=cost)
        except StorageError as exc:
            # Redis down: serve unlimited rather than refuse every tenant (the operator hears).
            log.warning("rate-limit storage unavailable, not limiting: %s", exc)
            return True

    async def request(self, key_id: str) -> None:
        """Count one request of ``key_id``; ``RateLimited`` when over its rate."""
        if self._requests is not None and not await self._hit(self._requests, "requests", key_id):
            raise RateLimited(
                f"this API key is over its request rate ({self._requests}); slow down",
                retry_after=await self._retry_after(self._requests, "requests", key_id),
                details={"limit": str(self._requests)},
            )

    async def answer_tokens(self, key_id: str, tokens: int) -> None:
        """Reserve ``tokens`` answer tokens for ``key_id`` in the current minute."""
        item = self._tokens
        if item is None:
            return
        if tokens > item.amount:
            # Waiting would not help: a client error, not a 429 to retry.
            raise InvalidInput(
                f"this request asks for {tokens} answer tokens (max_tokens times n) and this API "
                f"key may ask for {item.amount} per minute: lower max_tokens or n",
                code="tokens_over_limit",
                details={"field": "max_tokens"},
            )
        if not await self._hit(item, "tokens", key_id, cost=tokens):
            raise RateLimited(
                f"this API key is over its answer tokens per minute ({item.amount}); wait or "
                "ask for fewer (max_tokens times n)",
                retry_after=await self._retry_after(item, "tokens", key_id),
                details={"limit": str(item)},
            )

    def start_generation(self, tenant_id: str) -> Callable[[], None]:
        """Take one of the tenant's in-flight slots; returns the function that gives it back
        (calling it again does nothing)."""
        if self.max_in_flight is not None and self._in_flight[tenant_id] >= self.max_in_flight:
            raise RateLimited(
                f"this tenant has {self.max_in_flight} answers being generated already; retry "
                "when one finishes",
                retry_after=1,
                details={"limit": f"{self.max_in_flight} in flight"},
            )
        self._in_flight[tenant_id] += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._in_flight[tenant_id] -= 1
                if self._in_flight[tenant_id] <= 0:
                    del self._in_flight[tenant_id]

        return release

    @asynccontextmanager
    async def generation(self, tenant_id: str) -> AsyncIterator[None]:
        """Hold one of the tenant's in-flight slots for the block."""
        release = self.start_generation(tenant_id)
        try:
            yield
        finally:
            release()

    def in_flight(self, tenant_id: str) -> int:
        return self._in_flight[tenant_id]

    async def _retry_after(self, item: RateLimitItem, *identifiers: str) -> float:
        try:
            stats = await self._limiter.get_window_stats(item, *identifiers)
        except StorageError:
            return 1.0
        return max(1.0, math.ceil(stats.reset_time - time.time()))
