"""Stripe's webhook: signatures checked by the SDK on the raw body, events acted on once, and a
lapsed subscription suspends training (and, by the operator's setting, inference) until paid."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from api.app import create_app
from core.db import create_sessionmaker
from core.models import BillingStatus, StripeEvent, Tenant
from core.stripe_billing import apply_webhook_event
from tests.billing.conftest import event, signed, stripe_settings
from tests.billing.fake_stripe import FakeStripe
from tests.conftest import Backend, TenantKeys

WEBHOOK = "/v1/billing/stripe/webhook"
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def billing_state(backend: Backend, tenant_id: str) -> tuple[BillingStatus, str | None]:
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, tenant_id)
        assert tenant is not None
        return tenant.billing_status, tenant.billing_reason


# Customer -> the subscription tuneloop made for it (the one whose events count).
SUBSCRIPTIONS: dict[str, str] = {}


async def customer_of(backend: Backend, tenant_id: str) -> str:
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, tenant_id)
        assert tenant is not None and tenant.stripe_customer_id is not None
        assert tenant.stripe_subscription_id is not None
        SUBSCRIPTIONS[tenant.stripe_customer_id] = tenant.stripe_subscription_id
        return tenant.stripe_customer_id


def subscription(customer: str, status: str, sub: str | None = None) -> dict[str, object]:
    sub = sub or SUBSCRIPTIONS.get(customer, "sub_test")
    return {"id": sub, "object": "subscription", "customer": customer, "status": status}


def invoice(customer: str, id_: str, sub: str | None = None, **extra: object) -> dict[str, object]:
    """An invoice of the subscription (where API versions since 2025-03-31 put it)."""
    sub = sub or SUBSCRIPTIONS.get(customer, "sub_test")
    parent = {"type": "subscription_details", "subscription_details": {"subscription": sub}}
    return {"id": id_, "object": "invoice", "customer": customer, "parent": parent, **extra}


async def post_event(
    client: httpx.AsyncClient, evt: dict[str, object], **sign: object
) -> httpx.Response:
    body, headers = signed(evt, **sign)  # type: ignore[arg-type]
    return await client.post(WEBHOOK, content=body, headers=headers)


async def start_run(client: httpx.AsyncClient, t: TenantKeys) -> httpx.Response:
    return await client.post("/v1/runs", headers=t.auth("admin"), json={})


async def test_unpaid_subscription_suspends_training_and_payment_restores_it(
    make_billing_tenant, billing_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    r = await post_event(
        billing_client, event("customer.subscription.updated", subscription(customer, "past_due"))
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"received": True, "duplicate": False, "action": "suspended"}
    assert (await billing_state(backend, t.id))[0] is BillingStatus.suspended

    refused = await start_run(billing_client, t)
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert error["code"] == "billing_suspended"
    assert (
        f"{SUBSCRIPTIONS[customer]} is past_due" in error["message"]
        and "Pay the open invoice" in error["message"]
    )
    # Inference goes on: TUNELOOP_UNPAID_BLOCKS_INFERENCE is off by default.
    ok = await billing_client.post("/v1/chat/completions", headers=t.auth(), json=CHAT)
    assert ok.status_code == 200, ok.text
    usage = (await billing_client.get("/v1/usage", headers=t.auth("admin"))).json()
    assert usage["billing"]["status"] == "suspended"

    paid = invoice(customer, "in_test", status="paid")
    r = await post_event(billing_client, event("invoice.paid", paid))
    assert r.json()["action"] == "restored"
    assert await billing_state(backend, t.id) == (BillingStatus.active, None)
    # Past billing now: this app has no Temporal, so the run start stops at orchestration.
    after = await start_run(billing_client, t)
    assert (after.status_code, after.json()["error"]["code"]) == (503, "orchestration_unavailable")


@pytest.mark.parametrize(
    ("kind", "status", "suspends"),
    [
        ("customer.subscription.updated", "unpaid", True),
        ("customer.subscription.updated", "canceled", True),
        ("customer.subscription.deleted", "canceled", True),
        ("customer.subscription.updated", "active", False),
        ("customer.subscription.updated", "incomplete", False),
    ],
)
async def test_subscription_states(
    make_billing_tenant,
    billing_client: httpx.AsyncClient,
    backend: Backend,
    kind: str,
    status: str,
    suspends: bool,
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    r = await post_event(billing_client, event(kind, subscription(customer, status)))
    assert r.status_code == 200, r.text
    expected = BillingStatus.suspended if suspends else BillingStatus.active
    assert (await billing_state(backend, t.id))[0] is expected


async def test_failed_payment_suspends(
    make_billing_tenant, billing_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    failed = invoice(customer, "in_failed", status="open")
    r = await post_event(billing_client, event("invoice.payment_failed", failed))
    assert r.json()["action"] == "suspended"
    assert await billing_state(backend, t.id) == (
        BillingStatus.suspended,
        "payment of invoice in_failed failed",
    )


async def test_events_about_another_subscription_of_the_customer_change_nothing(
    make_billing_tenant, billing_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    ours = SUBSCRIPTIONS[customer]
    # An old subscription of the same customer is deleted: the tenant's own one still runs.
    gone = subscription(customer, "canceled", sub="sub_old")
    r = await post_event(billing_client, event("customer.subscription.deleted", gone))
    assert r.json()["action"] == "ignored"
    assert (await billing_state(backend, t.id))[0] is BillingStatus.active
    lapsed = event("customer.subscription.updated", subscription(customer, "unpaid"))
    assert (await post_event(billing_client, lapsed)).json()["action"] == "suspended"
    # Paying another subscription's invoice (either API version's shape) restores nothing.
    for other in (
        invoice(customer, "in_other", sub="sub_old"),
        {"id": "in_old", "object": "invoice", "customer": customer, "subscription": "sub_old"},
        {"id": "in_oneoff", "object": "invoice", "customer": customer},
    ):
        r = await post_event(billing_client, event("invoice.paid", other))
        assert r.json()["action"] == "ignored"
        assert (await billing_state(backend, t.id))[0] is BillingStatus.suspended
    # Nor does a second subscription becoming active take over the tenant's id.
    second = event("customer.subscription.updated", subscription(customer, "active", "sub_2"))
    assert (await post_event(billing_client, second)).json()["action"] == "ignored"
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, t.id)
        assert tenant is not None and tenant.stripe_subscription_id == ours
    # The older API version names the subscription at the top level.
    old_shape = {"id": "in_ours", "object": "invoice", "customer": customer, "subscription": ours}
    assert (await post_event(billing_client, event("invoice.paid", old_shape))).json()[
        "action"
    ] == "restored"


async def test_a_redelivered_event_is_acted_on_once(
    make_billing_tenant, billing_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    lapsed = event("customer.subscription.updated", subscription(customer, "unpaid"))
    assert (await post_event(billing_client, lapsed)).json()["action"] == "suspended"
    paid = event("invoice.paid", invoice(customer, "in_1"))
    assert (await post_event(billing_client, paid)).json()["action"] == "restored"
    # Stripe delivers the lapse again (it retries until it sees a 2xx): nothing happens.
    again = await post_event(billing_client, lapsed)
    assert again.status_code == 200
    assert again.json() == {"received": True, "duplicate": True, "action": "ignored"}
    assert (await billing_state(backend, t.id))[0] is BillingStatus.active


async def test_an_older_event_arriving_late_changes_nothing(
    make_billing_tenant, billing_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    now = int(time.time())
    failed = invoice(customer, "in_1")
    paid = invoice(customer, "in_1")
    # Stripe sent "failed" then "paid" (the retry succeeded), but they arrive the other way.
    r = await post_event(billing_client, event("invoice.paid", paid, created=now))
    assert r.json()["action"] == "restored"
    r = await post_event(billing_client, event("invoice.payment_failed", failed, created=now - 60))
    assert r.status_code == 200 and r.json()["action"] == "ignored"
    assert (await billing_state(backend, t.id))[0] is BillingStatus.active
    # A newer lapse still counts.
    later = event(
        "customer.subscription.updated", subscription(customer, "unpaid"), created=now + 1
    )
    assert (await post_event(billing_client, later)).json()["action"] == "suspended"


async def test_forged_tampered_and_stale_events_are_refused(
    make_billing_tenant, billing_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    evt = event("customer.subscription.updated", subscription(customer, "unpaid"))

    body, headers = signed(evt, secret="whsec_someone_else")
    forged = await billing_client.post(WEBHOOK, content=body, headers=headers)

    body, headers = signed(evt)
    tampered_body = body.replace(b'"unpaid"', b'"past_due"')
    tampered = await billing_client.post(WEBHOOK, content=tampered_body, headers=headers)

    body, headers = signed(evt, at=int(time.time()) - 3600)  # an hour old: a replay
    stale = await billing_client.post(WEBHOOK, content=body, headers=headers)

    unsigned = await billing_client.post(WEBHOOK, content=body)
    garbage = await billing_client.post(
        WEBHOOK, content=body, headers={"Stripe-Signature": "not a signature"}
    )
    for r in (forged, tampered, stale, unsigned, garbage):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_signature"
    assert "tolerance" in stale.json()["error"]["message"]
    assert (await billing_state(backend, t.id))[0] is BillingStatus.active
    async with create_sessionmaker(backend.engine)() as session:  # not even recorded
        assert await session.get(StripeEvent, evt["id"]) is None

    # The genuine event still works afterwards.
    assert (await post_event(billing_client, evt)).json()["action"] == "suspended"


async def test_signed_but_not_an_event_is_refused(billing_client: httpx.AsyncClient) -> None:
    body, headers = signed({"hello": "world"})
    r = await billing_client.post(WEBHOOK, content=body, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_event")


async def test_events_for_unknown_customers_and_types_are_acknowledged(
    billing_client: httpx.AsyncClient,
) -> None:
    other = event("customer.subscription.updated", subscription("cus_not_ours", "unpaid"))
    assert (await post_event(billing_client, other)).json()["action"] == "ignored"
    unrelated = event("charge.succeeded", {"id": "ch_1", "object": "charge"})
    assert (await post_event(billing_client, unrelated)).json()["action"] == "ignored"


async def test_webhook_without_a_secret_is_unavailable(client: httpx.AsyncClient) -> None:
    body, headers = signed(event("invoice.paid", {"id": "in_x", "customer": "cus_x"}))
    r = await client.post(WEBHOOK, content=body, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "billing_not_configured")


@pytest.fixture(scope="session")
async def strict_client(
    backend: Backend, fake_stripe: FakeStripe
) -> AsyncIterator[httpx.AsyncClient]:
    """An operator who stops inference for unpaid tenants (TUNELOOP_UNPAID_BLOCKS_INFERENCE)."""
    settings = stripe_settings(backend, fake_stripe, unpaid_blocks_inference=True)
    app: FastAPI = create_app(settings, engine=backend.engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test"
    ) as c:
        yield c
    await app.state.stripe.close()
    await app.state.backend.close()


async def test_unpaid_blocks_inference_when_the_operator_says_so(
    make_billing_tenant, strict_client: httpx.AsyncClient, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    await post_event(
        strict_client, event("customer.subscription.updated", subscription(customer, "unpaid"))
    )
    r = await strict_client.post("/v1/chat/completions", headers=t.auth(), json=CHAT)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "billing_suspended"
    assert "inference is suspended" in r.json()["error"]["message"]
    completions = await strict_client.post(
        "/v1/completions", headers=t.auth(), json={"model": "base", "prompt": "hi", "max_tokens": 2}
    )
    assert completions.status_code == 402

    await post_event(
        strict_client, event("customer.subscription.updated", subscription(customer, "active"))
    )
    ok = await strict_client.post("/v1/chat/completions", headers=t.auth(), json=CHAT)
    assert ok.status_code == 200, ok.text


async def test_a_stripe_customer_belongs_to_one_tenant(
    make_billing_tenant, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    a, b = await make_billing_tenant(), await make_billing_tenant()
    customer = await customer_of(backend, a.id)
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, b.id)
        assert tenant is not None
        tenant.stripe_customer_id = customer  # events for it would name two tenants
        with pytest.raises(IntegrityError):
            await session.commit()


async def _until_a_lock_is_awaited(backend: Backend, timeout: float = 30) -> None:
    """Until some session of this database waits for a lock (PostgreSQL's pg_locks)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with backend.engine.connect() as probe:
        while asyncio.get_running_loop().time() < deadline:
            waiting = await probe.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
            await probe.rollback()  # a fresh view of the locks on the next look
            if waiting:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the older event never waited for the tenant's row lock")


async def test_an_older_event_handled_while_a_newer_one_commits_changes_nothing(
    make_billing_tenant, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    if backend.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one writer at a time: the two cannot overlap")
    t = await make_billing_tenant()
    customer = await customer_of(backend, t.id)
    now = datetime.now(UTC)
    sessionmaker = create_sessionmaker(backend.engine)
    async with sessionmaker() as newer:
        # A newer event's transaction, part-way: the tenant row is being changed, not committed.
        tenant = await newer.scalar(select(Tenant).where(Tenant.id == t.id).with_for_update())
        assert tenant is not None
        tenant.billing_status, tenant.billing_event_at = BillingStatus.active, now
        await newer.flush()
        async with sessionmaker() as older:
            late = asyncio.create_task(
                apply_webhook_event(
                    older,
                    event_id=f"evt_{secrets.token_hex(8)}",
                    event_type="customer.subscription.updated",
                    obj=subscription(customer, "unpaid"),
                    created=now - timedelta(seconds=60),
                )
            )
            await _until_a_lock_is_awaited(backend)  # the older event waits for the row
            assert not late.done()
            await newer.commit()
            outcome = await late
    assert outcome.action == "ignored"
    assert (await billing_state(backend, t.id))[0] is BillingStatus.active
