"""Through a live uvicorn server (real sockets, so a response really ends before its background
work and a client really goes away): tenant creation never waits on Stripe, and a streamed
answer whose client disconnects is still recorded and metered."""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from core.db import create_sessionmaker
from core.models import Interaction, UsageRecord
from tests.billing.fake_stripe import FakeStripe
from tests.billing.test_stripe_reporting import tenant_row
from tests.conftest import Backend, TenantKeys, serve


async def test_tenant_creation_answers_without_waiting_for_stripe(
    billing_app: FastAPI, backend: Backend, fake_stripe: FakeStripe, platform_key: str
) -> None:
    # Long enough that a creation waiting on Stripe could not pass for a quick one, even on a
    # loaded machine.
    fake_stripe.delay_customers_s = 10.0
    try:
        async with serve(billing_app) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
            started = time.monotonic()
            r = await c.post(
                "/v1/tenants",
                json={"slug": f"slow-{secrets.token_hex(4)}"},
                headers={"Authorization": f"Bearer {platform_key}"},
            )
            took = time.monotonic() - started
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["admin_key"]["key"] and body["product_key"]["key"]
            assert took < 5.0, f"creation waited {took:.1f}s on Stripe"
            # Stripe's customer and subscription follow, after the response.
            for _ in range(300):
                row = await tenant_row(backend, body["tenant"]["id"])
                if row.stripe_subscription_id is not None:
                    break
                await asyncio.sleep(0.1)
            assert row.stripe_customer_id in fake_stripe.customers
            assert row.stripe_subscription_id in fake_stripe.subscriptions
    finally:
        fake_stripe.delay_customers_s = 0.0


async def test_a_stream_whose_client_disconnects_is_still_recorded_and_metered(
    make_billing_tenant, billing_app: FastAPI, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    t: TenantKeys = await make_billing_tenant()
    request = {
        "model": "base",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 48,
        "stream": True,
    }
    async with serve(billing_app) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        async with c.stream("POST", "/v1/chat/completions", headers=t.auth(), json=request) as r:
            assert r.status_code == 200
            interaction_id = r.headers["X-Interaction-Id"]
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"
                ):
                    break  # the first text: the client goes away
        sessionmaker = create_sessionmaker(backend.engine)
        for _ in range(200):
            async with sessionmaker() as session:
                usage = (
                    await session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == t.id))
                ).all()
            if usage:
                break
            await asyncio.sleep(0.05)
    assert len(usage) == 1 and usage[0].quantity > 0
    async with sessionmaker() as session:
        interaction = await session.get(Interaction, interaction_id)
    assert interaction is not None and interaction.completion
