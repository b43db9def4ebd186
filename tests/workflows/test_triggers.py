"""Runs started by something other than the admin's button: a schedule and fresh feedback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from sqlalchemy import select
from temporalio.client import Client
from temporalio.service import RPCError

from core.db import create_sessionmaker
from core.models import RunStatus, TrainingRun
from tests.conftest import Backend, TenantKeys
from tests.workflows.conftest import setup_tenant, thumbs, wait_for_run
from workflows.contracts import schedule_id

pytestmark = pytest.mark.usefixtures("worker")


async def _first_run(client: httpx.AsyncClient, t: TenantKeys, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = (await client.get("/v1/runs", headers=t.auth("admin"))).json()["data"]
        if runs:
            return runs[0]
        await asyncio.sleep(0.5)
    raise AssertionError("no run started")


async def test_a_policy_schedule_is_a_temporal_schedule_that_fires(
    loop_client: httpx.AsyncClient,
    make_tenant,
    tclient: Client,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t, schedule="0 3 * * *")
    handle = tclient.get_schedule_handle(schedule_id(t.id))
    described = await handle.describe()
    # The server stores a cron expression as a calendar: 03:00 every day.
    (calendar,) = described.schedule.spec.calendars
    assert [r.start for r in calendar.hour] == [3] and [r.start for r in calendar.minute] == [0]
    await handle.trigger()  # fire now rather than at 03:00
    run = await _first_run(loop_client, t)
    assert run["trigger"] == "schedule"
    run = await wait_for_run(loop_client, t, run["id"])
    assert run["status"] == "succeeded", run
    # Clearing the policy's schedule deletes the Temporal Schedule.
    await setup_tenant(loop_client, t, feedback=0, schedule=None)
    with pytest.raises(RPCError):
        await handle.describe()


async def test_enough_new_feedback_starts_a_run(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t, feedback=0, auto_train_after=40)
    r = await loop_client.post("/v1/feedback", headers=t.auth(), json={"items": thumbs(10)})
    assert r.status_code == 201  # 20 items: not yet
    await asyncio.sleep(1)
    assert (await loop_client.get("/v1/runs", headers=t.auth("admin"))).json()["data"] == []
    await asyncio.sleep(5)  # the per-tenant check runs at most every 5 s
    r = await loop_client.post("/v1/feedback", headers=t.auth(), json={"items": thumbs(15)[10:]})
    r = await loop_client.post("/v1/feedback", headers=t.auth(), json={"items": thumbs(30)[30:]})
    assert r.status_code == 201
    run = await _first_run(loop_client, t)
    assert run["trigger"] == "feedback"
    assert (await wait_for_run(loop_client, t, run["id"]))["status"] == "succeeded"


async def test_suspending_a_tenant_pauses_its_schedule_and_refuses_its_runs(
    loop_client: httpx.AsyncClient,
    make_tenant,
    platform_key: str,
    backend: Backend,
    tclient: Client,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t, schedule="0 3 * * *")
    handle = tclient.get_schedule_handle(schedule_id(t.id))
    operator = {"Authorization": f"Bearer {platform_key}"}

    async def set_status(status: str) -> None:
        r = await loop_client.patch(
            f"/v1/tenants/{t.id}", headers=operator, json={"status": status}
        )
        assert r.status_code == 200, r.text

    await set_status("suspended")
    assert (await handle.describe()).schedule.state.paused
    await handle.trigger()  # a run that starts anyway (an operator's trigger) is refused
    # The tenant's own keys are refused while it is suspended: watch its runs in the database.
    deadline = time.monotonic() + 60
    async with create_sessionmaker(backend.engine)() as session:
        while not await session.scalar(
            select(TrainingRun.id).where(
                TrainingRun.tenant_id == t.id, TrainingRun.status != RunStatus.queued
            )
        ):
            assert time.monotonic() < deadline, "the triggered run never got past start_run"
            await asyncio.sleep(0.5)
    await set_status("active")
    assert not (await handle.describe()).schedule.state.paused
    run = await wait_for_run(loop_client, t, (await _first_run(loop_client, t))["id"])
    assert run["status"] == "skipped" and "suspended" in run["reason"], run
    assert (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"] == []
