"""Shared fixtures: real databases migrated by Alembic (SQLite always, PostgreSQL when one is
reachable), the real app over ASGI, and tenants owned by each test."""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from api.app import create_app
from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings, Settings

# Nothing in the suite may reach a model hub: everything loads from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_url() -> str | None:
    """DATABASE_URL if it names Postgres, else the local server if one answers."""
    url = os.environ.get("DATABASE_URL") or ""
    if url.startswith("postgres"):
        return url
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=0.5).close()
    except OSError:
        return None
    return LOCAL_POSTGRES


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass
class Backend:
    name: str
    settings: ApiSettings
    engine: AsyncEngine
    url: str | None  # DATABASE_URL for subprocesses; None = embedded SQLite in data_dir


async def _admin_exec(url: str, sql: str) -> None:
    engine = create_engine(Settings(database_url=url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    """A freshly created, Alembic-migrated database for this test session."""
    data_dir = tmp_path_factory.mktemp(f"data-{request.param}")
    if request.param == "sqlite":
        settings = ApiSettings(data_dir=data_dir, database_url=None, base_model="tiny-random")
        url = None
    else:
        server = postgres_url()
        if server is None:
            if os.environ.get("CI"):
                pytest.fail("CI must run the PostgreSQL tests: no server on 127.0.0.1:5432")
            pytest.skip("no PostgreSQL reachable (set DATABASE_URL or start one on :5432)")
        name = f"tuneloop_test_{secrets.token_hex(4)}"
        await _admin_exec(server, f'CREATE DATABASE "{name}"')
        url = _with_database(server, name)
        settings = ApiSettings(data_dir=data_dir, database_url=url, base_model="tiny-random")
    engine = create_engine(settings)
    await migrations.upgrade(engine)
    yield Backend(request.param, settings, engine, url)
    await engine.dispose()
    if url is not None:
        await _admin_exec(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def client(backend: Backend) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(backend.settings, engine=backend.engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tuneloop.test") as c:
        yield c


@pytest.fixture(scope="session")
async def platform_key(backend: Backend) -> str:
    async with create_sessionmaker(backend.engine)() as session:
        issued = await create_key(session, tenant_id=None, role=KeyRole.platform, name="tests")
        await session.commit()
    return issued.secret


@dataclass
class TenantKeys:
    id: str
    slug: str
    admin: str
    product: str
    admin_key_id: str
    product_key_id: str

    def auth(self, role: str = "product") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin if role == 'admin' else self.product}"}


async def create_tenant(
    client: httpx.AsyncClient, platform_key: str, *, prefix: str = "t"
) -> TenantKeys:
    """A fresh tenant made through the platform API, with its first keys."""
    slug = f"{prefix}-{secrets.token_hex(5)}"
    r = await client.post(
        "/v1/tenants", json={"slug": slug}, headers={"Authorization": f"Bearer {platform_key}"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    return TenantKeys(
        id=body["tenant"]["id"],
        slug=slug,
        admin=body["admin_key"]["key"],
        product=body["product_key"]["key"],
        admin_key_id=body["admin_key"]["id"],
        product_key_id=body["product_key"]["id"],
    )


@pytest.fixture
async def make_tenant(client: httpx.AsyncClient, platform_key: str):  # type: ignore[no-untyped-def]
    """Create a fresh tenant through the platform API (each test owns its tenants)."""

    async def make() -> TenantKeys:
        return await create_tenant(client, platform_key)

    return make


@pytest.fixture
async def tenant(make_tenant) -> TenantKeys:  # type: ignore[no-untyped-def]
    return await make_tenant()


@asynccontextmanager
async def serve(app: FastAPI, *, start_timeout: float = 30) -> AsyncIterator[str]:
    """``app`` served by uvicorn on a loopback port in this event loop (the app's engine and the
    test's fixtures are bound to it); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + start_timeout
    while not server.started:
        if task.done():
            task.result()  # raises why it stopped
            raise AssertionError("uvicorn exited before it started")
        assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start in time"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The console script of the environment running the tests.
TUNELOOP = str(Path(sys.executable).parent / "tuneloop")


def tuneloop_env(data_dir: Path, database_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["TUNELOOP_DATA_DIR"] = str(data_dir)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return env


WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "then",
    "went",
    "to",
    "sleep",
    "in",
    "the",
    "warm",
    "sun",
    "by",
    "the",
    "door",
]


def short_or_long(rng: random.Random, *, short: bool) -> str:
    """A made-up answer: 2-5 words, or 30-50 (the judgment tests' users like the short ones)."""
    n = rng.randint(2, 5) if short else rng.randint(30, 50)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


async def dashboard_login(
    c: httpx.AsyncClient, key: str, *, next: str | None = None
) -> httpx.Response:
    """Log in as a browser does: the login page first (its form token and cookie), then the
    form."""
    page = await c.get("/dashboard/login")
    found = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert found, page.text
    data = {"key": key, "login_token": found.group(1)}
    if next is not None:
        data["next"] = next
    return await c.post("/dashboard/login", data=data)
