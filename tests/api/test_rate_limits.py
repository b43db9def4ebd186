"""Limits a tenant cannot exceed: requests per second and answer tokens per minute per key,
generations in flight per tenant; 429 ``rate_limit_exceeded`` with ``Retry-After``. Counted in
memory, and in a real Redis shared by two API processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from api.app import create_app
from tests.conftest import Backend, TenantKeys

REDIS = ("127.0.0.1", 6379)
ASK = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def app_client(backend: Backend, **limits: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(backend.settings.model_copy(update=limits), engine=backend.engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test"
    ) as c:
        yield c
    await app.state.backend.close()


def refused(r: httpx.Response) -> bool:
    if r.status_code != 429:
        return False
    assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    assert int(r.headers["retry-after"]) >= 1
    return True


async def test_requests_per_second_per_key(backend: Backend, tenant: TenantKeys) -> None:
    async with app_client(backend, rate_limit_rps=2) as c:
        codes = [(await c.get("/v1/keys", headers=tenant.auth("admin"))).status_code]
        codes.append((await c.get("/v1/keys", headers=tenant.auth("admin"))).status_code)
        third = await c.get("/v1/keys", headers=tenant.auth("admin"))
        assert codes == [200, 200] and refused(third)
        assert "request rate" in third.json()["error"]["message"]
        # Another key (the tenant's product key) has a rate of its own.
        r = await c.get("/v1/models", headers=tenant.auth())
        assert r.status_code == 200


async def test_answer_tokens_per_minute_per_key(backend: Backend, tenant: TenantKeys) -> None:
    async with app_client(backend, rate_limit_tokens_per_minute=20) as c:
        first = await c.post(
            "/v1/chat/completions", headers=tenant.auth(), json=ASK | {"max_tokens": 12}
        )
        assert first.status_code == 200, first.text
        second = await c.post(
            "/v1/chat/completions", headers=tenant.auth(), json=ASK | {"max_tokens": 12}
        )
        assert refused(second) and "tokens per minute" in second.json()["error"]["message"]
        # More than a whole minute's allowance in one request: said plainly.
        big = await c.post(
            "/v1/chat/completions", headers=tenant.auth(), json=ASK | {"max_tokens": 8, "n": 3}
        )
        # Waiting would not help: a client error, not a 429.
        assert big.status_code == 422 and big.json()["error"]["code"] == "tokens_over_limit"
        assert "lower max_tokens or n" in big.json()["error"]["message"]


async def test_generations_in_flight_per_tenant(
    backend: Backend,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with app_client(backend, max_in_flight_per_tenant=1) as c:

        async def ask(t: TenantKeys) -> httpx.Response:
            return await c.post(
                "/v1/chat/completions", headers=t.auth(), json=ASK | {"max_tokens": 16}
            )

        results = await asyncio.gather(ask(a), ask(a), ask(b))
        codes = sorted(r.status_code for r in results[:2])
        assert codes == [200, 429] and refused(next(r for r in results if r.status_code == 429))
        assert results[2].status_code == 200  # the other tenant is not held back
        assert (await ask(a)).status_code == 200  # the slot came back


async def test_a_stream_gives_its_slot_back_however_it_ends(
    backend: Backend, tenant: TenantKeys
) -> None:
    app = create_app(
        backend.settings.model_copy(update={"max_in_flight_per_tenant": 1}), engine=backend.engine
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test"
    ) as c:
        stream = ASK | {"max_tokens": 8, "stream": True}
        async with c.stream(
            "POST", "/v1/chat/completions", headers=tenant.auth(), json=stream
        ) as r:
            assert r.status_code == 200
            async for _ in r.aiter_lines():
                break  # the client leaves after the first line
        for _ in range(50):
            if app.state.limits.in_flight(tenant.id) == 0:
                break
            await asyncio.sleep(0.1)
        assert app.state.limits.in_flight(tenant.id) == 0
        # A stream that ran to its end, then a plain request: each found the slot free.
        r = await c.post("/v1/chat/completions", headers=tenant.auth(), json=stream)
        assert r.status_code == 200 and "[DONE]" in r.text
        r = await c.post("/v1/chat/completions", headers=tenant.auth(), json=ASK)
        assert r.status_code == 200
    await app.state.backend.close()


def _redis_url() -> str | None:
    try:
        socket.create_connection(REDIS, timeout=0.5).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Redis test: no server on 127.0.0.1:6379")
        pytest.skip("no Redis on 127.0.0.1:6379 (apt-get install redis-server; .ci/run does)")
    return f"redis://{REDIS[0]}:{REDIS[1]}/{secrets.randbelow(15) + 1}"


async def test_api_processes_share_the_counts_in_redis(
    backend: Backend, tenant: TenantKeys
) -> None:
    url = _redis_url()
    async with (
        app_client(backend, rate_limit_rps=2, redis_url=url) as one,
        app_client(backend, rate_limit_rps=2, redis_url=url) as other,
    ):
        assert (await one.get("/v1/keys", headers=tenant.auth("admin"))).status_code == 200
        assert (await other.get("/v1/keys", headers=tenant.auth("admin"))).status_code == 200
        # Each process alone has seen one request: only the shared count refuses the third.
        assert refused(await one.get("/v1/keys", headers=tenant.auth("admin")))
