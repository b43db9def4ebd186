"""Feedback ingest under faults.

* The API process killed (SIGKILL, by pid) and restarted mid-load: every item that got a 2xx is
  in the database exactly once, retried keyed items are never duplicated, and an unacknowledged
  batch is stored whole or not at all.
* PostgreSQL unreachable for a while mid-load (a TCP proxy in front of it is stopped, cutting
  every open connection, then started again): the API answers a clear 503 in the error envelope
  with Retry-After, clients retry, and after it comes back nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings, Settings
from tests.conftest import (
    TUNELOOP,
    Backend,
    TenantKeys,
    _admin_exec,
    _with_database,
    free_port,
    postgres_url,
    tuneloop_env,
)
from tests.reliability.ingest import Ledger, check_ledger, client_loop, items_sent

pytestmark = pytest.mark.reliability

RESULTS = Path(__file__).parent / "results"


def _report(name: str, data: dict[str, object]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


class LiveApi:
    """``tuneloop api`` as its own process, killed and restarted by pid."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.port = env, log, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [TUNELOOP, "api", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(self, timeout: float = 180) -> float:
        started = time.monotonic()
        async with httpx.AsyncClient() as c:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get(f"{self.url}/readyz")).status_code == 200:
                        return time.monotonic() - started
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() - started < timeout, "the API did not come up"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # a crash: no shutdown, no draining
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def test_api_killed_and_restarted_mid_ingest(
    tenant: TenantKeys, backend: Backend, tmp_path: Path
) -> None:
    env = tuneloop_env(backend.settings.data_dir, backend.url)
    # Durability under faults, at full speed: the per-key rate limit is not what is measured.
    env["TUNELOOP_RATE_LIMIT_RPS"] = "0"
    api = LiveApi(env, tmp_path / "api.log")
    api.start()
    try:
        await api.ready()
        ledger = Ledger()
        killed = asyncio.Event()
        kill_after = 120  # acknowledged items before the crash

        def on_ack() -> None:
            if ledger.acked >= kill_after and not killed.is_set():
                killed.set()

        async def crash() -> float:
            await killed.wait()
            api.kill()
            api.start()
            return await api.ready()

        # Room for a restart that re-imports the ML stack on a loaded machine.
        deadline = time.monotonic() + 240
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as http:
            auth = tenant.auth()
            clients = [
                client_loop(
                    http,
                    auth,
                    ledger,
                    requests=60,
                    keyed=i % 2 == 0,
                    deadline=deadline,
                    on_ack=on_ack,
                )
                for i in range(8)
            ]
            restart_s, *_ = await asyncio.gather(crash(), *clients)
        counts = await check_ledger(backend.engine, tenant.id, ledger)
        # The crash really cut requests off, and the load carried on after it.
        assert ledger.cut_in_flight > 0, "nothing was in flight when the API died"
        # Keyed clients retried until acknowledged: all of their items are in.
        assert len(ledger.acked_keys) == 4 * items_sent(60)
        assert ledger.acked > kill_after * 2
        _report(
            f"ingest_api_killed_{backend.name}",
            {
                **counts,
                "transport_errors": ledger.transport_errors,
                "cut_in_flight": ledger.cut_in_flight,
                "replayed_after_retry": ledger.replayed_after_retry,
                "unacked_batches": len(ledger.unacked_batches),
                "restart_s": round(restart_s, 2),
                "statuses": dict(ledger.statuses),
            },
        )
    finally:
        api.stop()


class TcpProxy:
    """A TCP forwarder the test can stop (refusing new connections and cutting open ones, as a
    network partition or a database restart does) and start again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.open):
            writer.transport.abort()
        self.open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.open -= {writer, up_writer}


@pytest.fixture
async def pg_through_proxy() -> AsyncIterator[tuple[str, TcpProxy]]:
    """A fresh, migrated PostgreSQL database, reached through a proxy the test controls.

    Not the ``backend`` fixture: the SQLite backend is a file inside the API process, it cannot
    become unreachable, so this fault exists only for a networked database."""
    import migrations

    server = postgres_url()
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: no server on 127.0.0.1:5432")
        pytest.skip("no PostgreSQL reachable (set DATABASE_URL or start one on :5432)")
    name = f"tuneloop_outage_{secrets.token_hex(4)}"
    await _admin_exec(server, f'CREATE DATABASE "{name}"')
    direct = _with_database(server, name)
    engine = create_engine(Settings(database_url=direct))
    await migrations.upgrade(engine)
    await engine.dispose()
    host, port = server.split("@", 1)[1].split("/", 1)[0].split(":")
    proxy = TcpProxy((host, int(port)))
    await proxy.start()
    via_proxy = direct.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    try:
        yield via_proxy, proxy
    finally:
        with contextlib.suppress(AssertionError):
            await proxy.stop()
        await _admin_exec(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_database_unreachable_mid_ingest(
    pg_through_proxy: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    url, proxy = pg_through_proxy
    # Auth cached for a second only: during the outage new lookups hit the database too.
    settings = ApiSettings(
        data_dir=tmp_path,
        database_url=url,
        base_model="tiny-random",
        auth_cache_seconds=1,
        rate_limit_rps=0,  # durability is measured here, not the per-key rate limit
    )
    app = create_app(settings)
    engine = app.state.engine
    async with create_sessionmaker(engine)() as s:
        platform = await create_key(s, tenant_id=None, role=KeyRole.platform, name="outage")
        await s.commit()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tuneloop.test") as http:
        r = await http.post(
            "/v1/tenants",
            json={"slug": f"outage-{secrets.token_hex(3)}"},
            headers={"Authorization": f"Bearer {platform.secret}"},
        )
        made = r.json()
        tenant_id = made["tenant"]["id"]
        auth = {"Authorization": f"Bearer {made['product_key']['key']}"}
        ledger = Ledger()
        outage = asyncio.Event()

        def on_ack() -> None:
            if ledger.acked >= 100:
                outage.set()

        async def cut() -> dict[str, float]:
            await outage.wait()
            await proxy.stop()
            down_at = time.monotonic()
            await asyncio.sleep(3)
            ready_while_down = (await http.get("/readyz")).status_code
            await proxy.start()
            return {"down_s": time.monotonic() - down_at, "readyz_while_down": ready_while_down}

        deadline = time.monotonic() + 90
        clients = [
            client_loop(
                http, auth, ledger, requests=50, keyed=True, deadline=deadline, on_ack=on_ack
            )
            for _ in range(6)
        ]
        down, *_ = await asyncio.gather(cut(), *clients)
        ready_after = (await http.get("/readyz")).status_code
    counts = await check_ledger(engine, tenant_id, ledger)
    await app.state.backend.close()
    await engine.dispose()

    # A clear 503 while it was down, in the envelope, and only 503s: no 500s.
    assert ledger.statuses[503] > 0, ledger.statuses
    assert set(ledger.statuses) <= {200, 201, 503}, ledger.statuses
    for body in ledger.error_bodies:
        assert body["error"]["code"] == "unavailable" and body["retry_after"] == "1", body
    assert down["readyz_while_down"] == 503 and ready_after == 200
    assert counts["acked"] == 6 * items_sent(50) == counts["rows"]  # every item, once
    _report(
        "ingest_database_outage",
        {**counts, **down, "statuses": dict(ledger.statuses), "retried": ledger.statuses[503]},
    )
