"""Dashboard clients: each one is a separate browser-like session with its own cookie jar."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from tests.conftest import Backend, dashboard_login

# The real Temporal dev server and a worker on both queues, for the browser test's runs.
from tests.workflows.conftest import temporal, worker  # noqa: F401

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')

Session = Callable[[str], Awaitable[httpx.AsyncClient]]


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


@pytest.fixture(scope="session")
async def dashboard_app(backend: Backend) -> AsyncIterator[FastAPI]:
    app = create_app(backend.settings, engine=backend.engine)
    yield app
    await app.state.backend.close()


@pytest.fixture
async def login(dashboard_app: FastAPI) -> AsyncIterator[Session]:
    """``await login(key)`` → a client logged in to the dashboard with that key."""
    clients: list[httpx.AsyncClient] = []

    async def make(key: str) -> httpx.AsyncClient:
        c = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=dashboard_app), base_url="http://tuneloop.test"
        )
        clients.append(c)
        r = await dashboard_login(c, key)
        assert r.status_code == 303, r.text
        return c

    yield make
    for c in clients:
        await c.aclose()


@pytest.fixture
async def anonymous(dashboard_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard_app), base_url="http://tuneloop.test"
    ) as c:
        yield c
