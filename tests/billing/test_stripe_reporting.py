"""Tenants become Stripe customers, and the usage ledger reaches Stripe as meter events exactly
once: the real SDK against the fake Stripe, on both database backends."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe
from sqlalchemy import func, select, update
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from core.db import create_sessionmaker
from core.models import Tenant, UsageRecord
from core.stripe_billing import EVENT_NAMES, StripeBilling, StripeMisconfigured
from core.usage import INFERENCE_TOKENS, TRAINING_TOKENS
from tests.billing.conftest import add_usage, stripe_settings
from tests.billing.fake_stripe import FakeStripe
from tests.conftest import Backend
from workflows.billing_activities import BillingActivities
from workflows.contracts import ReportBatchInput


def billing_of(backend: Backend, fake: FakeStripe) -> StripeBilling:
    built = StripeBilling.from_settings(stripe_settings(backend, fake))
    assert built is not None
    return built


async def tenant_row(backend: Backend, tenant_id: str) -> Tenant:
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, tenant_id)
        assert tenant is not None
        return tenant


async def unreported(backend: Backend, tenant_id: str) -> int:
    async with create_sessionmaker(backend.engine)() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(UsageRecord)
                .where(UsageRecord.tenant_id == tenant_id, UsageRecord.reported_at.is_(None))
            )
            or 0
        )


async def report_all(backend: Backend, stripe_billing: StripeBilling) -> int:
    """Report until the backlog is empty (other tests' rows included); rows sent."""
    sent = 0
    async with create_sessionmaker(backend.engine)() as session:
        while True:
            outcome = await stripe_billing.report(session, limit=50)
            assert outcome.retryable is None
            sent += outcome.sent
            if outcome.sent == 0:
                return sent


async def test_a_new_tenant_gets_a_customer_and_a_metered_subscription(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    row = await tenant_row(backend, t.id)
    assert row.stripe_customer_id in fake_stripe.customers
    assert fake_stripe.customers[row.stripe_customer_id]["metadata"]["tenant_id"] == t.id
    sub = fake_stripe.subscriptions[row.stripe_subscription_id or ""]
    assert sub["customer"] == row.stripe_customer_id and sub["status"] == "active"
    meters = {
        fake_stripe.meters[item["price"]["recurring"]["meter"]]["event_name"]
        for item in sub["items"]["data"]
    }
    assert meters == {EVENT_NAMES[INFERENCE_TOKENS], EVENT_NAMES[TRAINING_TOKENS]}
    # Cents per token: $0.002 per 1k inference tokens, $0.01 per 1k training tokens.
    amounts = {
        fake_stripe.meters[i["price"]["recurring"]["meter"]]["event_name"]: Decimal(
            i["price"]["unit_amount_decimal"]
        )
        for i in sub["items"]["data"]
    }
    assert amounts == {
        EVENT_NAMES[INFERENCE_TOKENS]: Decimal("0.0002"),
        EVENT_NAMES[TRAINING_TOKENS]: Decimal("0.001"),
    }


async def test_catalog_setup_is_idempotent(backend: Backend, fake_stripe: FakeStripe) -> None:
    first = await billing_of(backend, fake_stripe).catalog()
    meters, prices = len(fake_stripe.meters), len(fake_stripe.prices)
    again = await billing_of(backend, fake_stripe).catalog()  # a new process, say
    assert again == first
    assert (len(fake_stripe.meters), len(fake_stripe.prices)) == (meters, prices)


async def test_stripe_down_at_creation_still_creates_the_tenant_and_reporting_catches_up(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    fake_stripe.fail_customers = 1
    t = await make_billing_tenant()
    assert (await tenant_row(backend, t.id)).stripe_customer_id is None
    await add_usage(backend, t.id, 120)
    await report_all(backend, billing_of(backend, fake_stripe))
    row = await tenant_row(backend, t.id)
    assert row.stripe_customer_id in fake_stripe.customers
    assert row.stripe_subscription_id in fake_stripe.subscriptions
    assert fake_stripe.usage(row.stripe_customer_id or "", EVENT_NAMES[INFERENCE_TOKENS]) == 120
    assert await unreported(backend, t.id) == 0


async def test_each_ledger_row_is_one_meter_event_with_the_row_id(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    await add_usage(backend, t.id, 10, 20, 30)
    await add_usage(backend, t.id, 500, meter=TRAINING_TOKENS)
    stripe_billing = billing_of(backend, fake_stripe)
    await report_all(backend, stripe_billing)
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    async with create_sessionmaker(backend.engine)() as session:
        ids = set(
            await session.scalars(select(UsageRecord.id).where(UsageRecord.tenant_id == t.id))
        )
    assert {e["identifier"] for e in fake_stripe.event_for_customer(customer)} == ids
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 60
    assert fake_stripe.usage(customer, EVENT_NAMES[TRAINING_TOKENS]) == 500
    assert await unreported(backend, t.id) == 0
    # Reported rows are never sent again.
    posts = sum(fake_stripe.meter_event_posts[i] for i in ids)
    await report_all(backend, stripe_billing)
    assert sum(fake_stripe.meter_event_posts[i] for i in ids) == posts == 4


async def test_a_crash_between_stripe_accepting_and_marking_reported_bills_once(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    await add_usage(backend, t.id, 7, 11)
    stripe_billing = billing_of(backend, fake_stripe)

    async def crash(*_: object) -> None:
        raise ConnectionError("process died before the ledger was updated")

    monkeypatch.setattr(StripeBilling, "mark_reported", staticmethod(crash))
    async with create_sessionmaker(backend.engine)() as session:
        with pytest.raises(ConnectionError):
            await stripe_billing.report(session, limit=1000)
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 18  # Stripe has them
    assert await unreported(backend, t.id) == 2  # the ledger does not know yet

    monkeypatch.undo()
    await report_all(backend, stripe_billing)  # the retry sends the same rows again
    assert await unreported(backend, t.id) == 0
    events = fake_stripe.event_for_customer(customer)
    assert len(events) == 2
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 18  # counted once
    assert all(fake_stripe.meter_event_posts[e["identifier"]] == 2 for e in events)


async def test_stripe_outage_leaves_rows_unreported_and_says_retry(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    await add_usage(backend, t.id, 5)
    stripe_billing = billing_of(backend, fake_stripe)
    await report_all(backend, stripe_billing)  # drain what other tests left
    await add_usage(backend, t.id, 6, 7)
    fake_stripe.fail_meter_events = 1
    async with create_sessionmaker(backend.engine)() as session:
        outcome = await stripe_billing.report(session, limit=1000)
    assert outcome.retryable is not None and "APIError" in outcome.retryable
    assert (outcome.sent, outcome.pending) == (1, 1)  # the other row went through
    assert await unreported(backend, t.id) == 1
    await report_all(backend, stripe_billing)
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 18


async def test_usage_endpoint_shows_reporting_and_is_tenant_scoped(
    make_billing_tenant,
    billing_client: httpx.AsyncClient,
    backend: Backend,
    fake_stripe: FakeStripe,
    platform_key: str,
) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_billing_tenant(), await make_billing_tenant()
    await add_usage(backend, a.id, 1000, 3000)
    await report_all(backend, billing_of(backend, fake_stripe))
    await add_usage(backend, a.id, 500)
    r = await billing_client.get("/v1/usage", headers=a.auth("admin"))
    assert r.status_code == 200, r.text
    body = r.json()
    inference = next(m for m in body["meters"] if m["meter"] == INFERENCE_TOKENS)
    assert inference["quantity"] == 4500
    assert Decimal(inference["cost_usd"]) == Decimal("0.009")
    assert (inference["reported_rows"], inference["unreported_rows"]) == (2, 1)
    assert body["billing"]["stripe_configured"] is True
    assert (
        body["billing"]["stripe_customer_id"]
        == (await tenant_row(backend, a.id)).stripe_customer_id
    )
    assert body["billing"]["status"] == "active"

    other = (await billing_client.get("/v1/usage", headers=b.auth("admin"))).json()
    assert all(m["quantity"] == 0 for m in other["meters"])  # a's usage is invisible to b
    assert other["billing"]["stripe_customer_id"] != body["billing"]["stripe_customer_id"]
    for headers, status in (
        (a.auth("product"), 403),
        ({"Authorization": f"Bearer {platform_key}"}, 403),
        ({}, 401),
    ):
        assert (await billing_client.get("/v1/usage", headers=headers)).status_code == status


async def test_a_tenant_whose_subscription_failed_gets_one_before_its_usage_is_sent(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    fake_stripe.fail_subscriptions = 2  # at creation, and again at the first reporting pass
    t = await make_billing_tenant()
    row = await tenant_row(backend, t.id)
    assert row.stripe_customer_id in fake_stripe.customers
    assert row.stripe_subscription_id is None
    await add_usage(backend, t.id, 33)
    stripe_billing = billing_of(backend, fake_stripe)
    async with create_sessionmaker(backend.engine)() as session:
        await stripe_billing.report(session, limit=10_000)
    # No subscription yet: metered but never invoiced, so not sent at all.
    assert fake_stripe.event_for_customer(row.stripe_customer_id or "") == []
    assert await unreported(backend, t.id) == 1
    await report_all(backend, stripe_billing)
    row = await tenant_row(backend, t.id)
    assert row.stripe_subscription_id in fake_stripe.subscriptions
    assert fake_stripe.usage(row.stripe_customer_id or "", EVENT_NAMES[INFERENCE_TOKENS]) == 33
    assert await unreported(backend, t.id) == 0


async def test_a_row_past_stripes_age_limit_is_left_to_the_operator_and_holds_nothing_up(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    await add_usage(backend, t.id, 1)
    async with create_sessionmaker(backend.engine)() as session:
        await session.execute(
            update(UsageRecord)
            .where(UsageRecord.tenant_id == t.id)
            .values(created_at=datetime.now(UTC) - timedelta(days=40))
        )
        await session.commit()
    await add_usage(backend, t.id, 2)
    await report_all(backend, billing_of(backend, fake_stripe))  # no retryable, no stall
    customer = (await tenant_row(backend, t.id)).stripe_customer_id or ""
    assert fake_stripe.usage(customer, EVENT_NAMES[INFERENCE_TOKENS]) == 2
    assert await unreported(backend, t.id) == 1  # the old one, logged, never sent


async def test_the_fake_refuses_a_reused_idempotency_key_with_other_parameters(
    backend: Backend, fake_stripe: FakeStripe
) -> None:
    stripe_billing = billing_of(backend, fake_stripe)
    await stripe_billing.catalog()
    customer = await stripe_billing.client.v1.customers.create_async(
        {"name": "x", "metadata": {"tenant_id": "none"}}
    )
    key = {"idempotency_key": f"test-{secrets.token_hex(6)}"}
    params = {
        "event_name": EVENT_NAMES[INFERENCE_TOKENS],
        "identifier": f"test-{secrets.token_hex(6)}",
        "timestamp": int(time.time()),
        "payload": {"stripe_customer_id": customer.id, "value": "1"},
    }
    meter_events = stripe_billing.client.v1.billing.meter_events
    await meter_events.create_async(params, key)  # type: ignore[arg-type]
    await meter_events.create_async(params, key)  # type: ignore[arg-type]  # a replay
    with pytest.raises(stripe.IdempotencyError):
        await meter_events.create_async(
            {**params, "timestamp": params["timestamp"] - 1},  # type: ignore[arg-type,operator]
            key,  # type: ignore[arg-type]
        )
    await stripe_billing.close()


async def test_a_refused_api_key_stops_the_pass_at_once(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    await report_all(backend, billing_of(backend, fake_stripe))
    await add_usage(backend, t.id, *range(1, 41))
    settings = stripe_settings(backend, fake_stripe).model_copy(
        update={"stripe_api_key": "sk_test_revoked"}
    )
    wrong = StripeBilling.from_settings(settings)
    assert wrong is not None
    refused = fake_stripe.refused_keys
    async with create_sessionmaker(backend.engine)() as session:
        with pytest.raises(StripeMisconfigured):
            await wrong.report(session, limit=1000)
    assert fake_stripe.refused_keys - refused <= 8  # not one failing call per row
    activities = BillingActivities(sessionmaker=create_sessionmaker(backend.engine), stripe=wrong)
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(activities.report_usage_batch, ReportBatchInput())
    assert failed.value.type == "StripeMisconfigured" and failed.value.non_retryable
    assert await unreported(backend, t.id) == 40
    await wrong.close()


async def test_no_transaction_is_held_open_while_stripe_is_called(
    make_billing_tenant, backend: Backend, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    await add_usage(backend, t.id, 3)
    stripe_billing = billing_of(backend, fake_stripe)
    real = StripeBilling.send_meter_event
    in_transaction: list[bool] = []
    async with create_sessionmaker(backend.engine)() as session:

        async def watched(self: StripeBilling, row: Any, customer_id: str) -> None:
            in_transaction.append(session.in_transaction())
            await real(self, row, customer_id)

        monkeypatch.setattr(StripeBilling, "send_meter_event", watched)
        await stripe_billing.report(session, limit=10_000)
    assert in_transaction and not any(in_transaction)
    assert await unreported(backend, t.id) == 0


async def test_the_catalog_finds_its_meters_past_the_first_page(
    backend: Backend, fake_stripe: FakeStripe
) -> None:
    first = await billing_of(backend, fake_stripe).catalog()
    for _ in range(120):  # meters of the account's other products, newer than tuneloop's
        mid = fake_stripe.new_id("mtr")
        fake_stripe.meters[mid] = {
            "id": mid,
            "object": "billing.meter",
            "status": "active",
            "event_name": f"other_{mid}",
        }
    fake_stripe.forget_idempotency_keys()  # a day later: only the listing can find them
    assert await billing_of(backend, fake_stripe).catalog() == first
