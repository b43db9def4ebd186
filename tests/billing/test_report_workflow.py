"""The ``ReportUsage`` workflow on the real Temporal dev server: Temporal's retries carry it through
a crash after Stripe accepted and through a Stripe outage, and nothing is billed twice. Also the
schedule that runs it, and billing refusals of runs a schedule fires."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from temporalio.client import Client, ScheduleOverlapPolicy, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.db import create_sessionmaker
from core.models import BillingStatus, RunStatus, Tenant, TrainingRun
from core.stripe_billing import EVENT_NAMES, StripeBilling
from core.usage import INFERENCE_TOKENS
from tests.billing.conftest import add_usage, stripe_settings
from tests.billing.fake_stripe import FakeStripe
from tests.billing.test_stripe_reporting import (
    billing_of,
    report_all,
    tenant_row,
    unreported,
)
from tests.conftest import Backend, TenantKeys
from tests.workflows.conftest import address
from workflows.billing import ReportUsage
from workflows.billing_activities import BillingActivities, ensure_report_schedule
from workflows.contracts import (
    CPU_QUEUE,
    PERSONALIZE_WORKFLOW,
    REPORT_USAGE_SCHEDULE_ID,
    PersonalizeInput,
    PersonalizeResult,
    ReportUsageInput,
    ReportUsageResult,
)
from workflows.worker import run_worker


@pytest.fixture
async def reporter(
    backend: Backend, fake_stripe: FakeStripe, temporal: WorkflowEnvironment
) -> AsyncIterator[tuple[Client, str, StripeBilling]]:
    """A worker running only the reporter, on a task queue of this test's own."""
    queue = f"billing-{uuid.uuid4()}"
    stripe_billing = billing_of(backend, fake_stripe)
    activities = BillingActivities(
        sessionmaker=create_sessionmaker(backend.engine), stripe=stripe_billing
    )
    async with Worker(
        temporal.client,
        task_queue=queue,
        workflows=[ReportUsage],
        activities=[activities.report_usage_batch],
    ):
        yield temporal.client, queue, stripe_billing
    await stripe_billing.close()


async def run_reporter(client: Client, queue: str, batch_size: int = 3) -> ReportUsageResult:
    return await client.execute_workflow(
        ReportUsage.run,
        ReportUsageInput(batch_size=batch_size),
        id=f"report-usage-test-{uuid.uuid4()}",
        task_queue=queue,
        execution_timeout=timedelta(minutes=2),
    )


async def test_crash_after_stripe_accepted_is_retried_and_billed_once(
    make_billing_tenant,
    backend: Backend,
    fake_stripe: FakeStripe,
    reporter: tuple[Client, str, StripeBilling],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    client, queue, stripe_billing = reporter
    t: TenantKeys = await make_billing_tenant()
    await report_all(backend, stripe_billing)  # what other tests left: only this test's rows
    await add_usage(backend, t.id, 3, 4, 5, 6, 7)
    real = StripeBilling.mark_reported
    crashes = []

    async def crash_once(session: Any, ids: Any) -> None:
        if not crashes:
            crashes.append(list(ids))
            raise RuntimeError("worker lost between Stripe's answer and the ledger update")
        await real(session, ids)

    monkeypatch.setattr(StripeBilling, "mark_reported", staticmethod(crash_once))
    result = await run_reporter(client, queue)

    assert crashes and crashes[0]  # the first attempt did get Stripe's acceptance, then died
    assert result.batches >= 2  # paged through in batches of 3
    assert await unreported(backend, t.id) == 0
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    events = fake_stripe.event_for_customer(customer)
    assert len(events) == 5
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 25  # once each
    resent = [e for e in events if fake_stripe.meter_event_posts[e["identifier"]] > 1]
    assert {e["identifier"] for e in resent} == set(crashes[0])  # resent, and counted once


async def test_stripe_outage_is_retried_with_backoff(
    make_billing_tenant,
    backend: Backend,
    fake_stripe: FakeStripe,
    reporter: tuple[Client, str, StripeBilling],
) -> None:  # type: ignore[no-untyped-def]
    client, queue, stripe_billing = reporter
    t: TenantKeys = await make_billing_tenant()
    await report_all(backend, stripe_billing)  # what other tests left: Stripe down for all
    await add_usage(backend, t.id, 40, 2)
    fake_stripe.fail_meter_events = 2
    result = await run_reporter(client, queue, batch_size=200)
    assert fake_stripe.fail_meter_events == 0
    assert result.sent >= 2
    assert await unreported(backend, t.id) == 0
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 42


async def test_a_row_stripe_did_not_take_holds_up_none_behind_it(
    make_billing_tenant,
    backend: Backend,
    fake_stripe: FakeStripe,
    reporter: tuple[Client, str, StripeBilling],
) -> None:  # type: ignore[no-untyped-def]
    client, queue, stripe_billing = reporter
    t: TenantKeys = await make_billing_tenant()
    await report_all(backend, stripe_billing)
    await add_usage(backend, t.id, 1, 2, 3, 4, 5, 6)
    fake_stripe.fail_meter_events = 1  # one row of the first batch meets a failing Stripe
    with pytest.raises(WorkflowFailureError) as failed:
        await run_reporter(client, queue, batch_size=2)
    assert "StripeUnavailable" in str(failed.value.cause)
    assert await unreported(backend, t.id) == 1  # the later batches went through
    await run_reporter(client, queue)  # the next firing sends it
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 21


async def test_the_schedule_runs_the_reporter(
    make_billing_tenant,
    backend: Backend,
    fake_stripe: FakeStripe,
    reporter: tuple[Client, str, StripeBilling],
) -> None:  # type: ignore[no-untyped-def]
    client, queue, _ = reporter
    t: TenantKeys = await make_billing_tenant()
    await add_usage(backend, t.id, 9)
    await ensure_report_schedule(client, every=timedelta(hours=1), task_queue=queue)
    await ensure_report_schedule(client, every=timedelta(minutes=1), task_queue=queue)  # again
    handle = client.get_schedule_handle(REPORT_USAGE_SCHEDULE_ID)
    try:
        described = await handle.describe()
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(minutes=1)]
        assert described.schedule.policy.overlap is ScheduleOverlapPolicy.SKIP
        await handle.trigger()
        for _ in range(100):
            if await unreported(backend, t.id) == 0:
                break
            await asyncio.sleep(0.2)
        assert await unreported(backend, t.id) == 0
        customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
        assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 9
    finally:
        await handle.delete()


async def test_a_scheduled_run_of_a_suspended_tenant_ends_skipped(
    make_billing_tenant,
    billing_client: httpx.AsyncClient,
    backend: Backend,
    temporal: WorkflowEnvironment,
    worker: None,
) -> None:  # type: ignore[no-untyped-def]
    t: TenantKeys = await make_billing_tenant()
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, t.id)
        assert tenant is not None
        tenant.billing_status = BillingStatus.suspended
        tenant.billing_reason = "subscription sub_x is unpaid"
        await session.commit()
    # What a Temporal Schedule starts: no run row yet, no API in between.
    result = await temporal.client.execute_workflow(
        PERSONALIZE_WORKFLOW,
        PersonalizeInput(tenant_id=t.id, trigger="schedule"),
        id=f"personalize/{t.id}-scheduled-{uuid.uuid4()}",
        task_queue=CPU_QUEUE,
        result_type=PersonalizeResult,
        execution_timeout=timedelta(minutes=2),
    )
    assert result.status == "skipped"
    assert "training is suspended" in (result.reason or "")
    async with create_sessionmaker(backend.engine)() as session:
        run = await session.get(TrainingRun, result.run_id)
    assert run is not None and run.status is RunStatus.skipped
    assert "sub_x is unpaid" in (run.reason or "")
    runs = await billing_client.get("/v1/runs", headers=t.auth("admin"))
    assert [r["status"] for r in runs.json()["data"]] == ["skipped"]


async def test_a_worker_with_stripe_configured_creates_the_schedule(
    backend: Backend, fake_stripe: FakeStripe, temporal: WorkflowEnvironment
) -> None:
    settings = stripe_settings(
        backend,
        fake_stripe,
        temporal_address=address(temporal),
        billing_report_every_s=3600,
    )
    stop = asyncio.Event()
    # Its own connection (from TEMPORAL_ADDRESS), as in production: one client may not run two
    # workers on the cpu queue, and the session's worker may be polling it already.
    task = asyncio.create_task(run_worker(settings, queue="cpu", stop=stop))
    handle = temporal.client.get_schedule_handle(REPORT_USAGE_SCHEDULE_ID)
    try:
        for _ in range(150):
            try:
                described = await handle.describe()
                break
            except RPCError:  # not created yet
                assert not task.done(), task
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("the worker did not create the usage-reporting schedule")
        assert [i.every for i in described.schedule.spec.intervals] == [timedelta(hours=1)]
    finally:
        stop.set()
        await task
        await handle.delete()


async def test_a_worker_without_stripe_removes_the_schedule_left_behind(
    backend: Backend, temporal: WorkflowEnvironment
) -> None:
    await ensure_report_schedule(temporal.client, every=timedelta(hours=1))  # Stripe was on
    settings = backend.settings.model_copy(update={"temporal_address": address(temporal)})
    assert not settings.stripe_configured
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, queue="cpu", stop=stop))
    handle = temporal.client.get_schedule_handle(REPORT_USAGE_SCHEDULE_ID)
    try:
        for _ in range(150):
            try:
                await handle.describe()
            except RPCError as exc:
                assert exc.status == RPCStatusCode.NOT_FOUND
                break
            assert not task.done(), task
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the schedule that nothing would run is still there")
    finally:
        stop.set()
        await task
