"""Billing fixtures: a fake Stripe on a loopback port (the real SDK talks to it), and the app
configured with Stripe pointing there."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import stripe
from fastapi import FastAPI

from api.app import create_app
from core.db import create_sessionmaker
from core.settings import ApiSettings
from core.usage import INFERENCE_TOKENS, record_usage
from tests.billing.fake_stripe import FakeStripe, FakeStripeServer
from tests.conftest import Backend, TenantKeys, create_tenant

# The real Temporal dev server, for the reporter's workflow tests.
from tests.workflows.conftest import temporal, worker  # noqa: F401

WEBHOOK_SECRET = "whsec_test_" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripeServer(FakeStripe()) as fake:
        yield fake


def stripe_settings(backend: Backend, fake: FakeStripe, **extra: Any) -> ApiSettings:
    return backend.settings.model_copy(
        update={
            "stripe_api_key": fake.api_key,
            "stripe_webhook_secret": WEBHOOK_SECRET,
            "stripe_api_base": fake.url,
            "stripe_meter_events_base": fake.url,
            # Billing decisions are seen at once (no per-process memo) in these tests.
            "auth_cache_seconds": 0.0,
            **extra,
        }
    )


async def _app_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test"
    )


@pytest.fixture(scope="session")
async def billing_app(backend: Backend, fake_stripe: FakeStripe) -> AsyncIterator[FastAPI]:
    """The API with Stripe configured (pointing at the fake)."""
    app = create_app(stripe_settings(backend, fake_stripe), engine=backend.engine)
    yield app
    await app.state.stripe.close()
    await app.state.backend.close()


@pytest.fixture(scope="session")
async def billing_client(billing_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with await _app_client(billing_app) as c:
        yield c


@pytest.fixture
async def make_billing_tenant(billing_client: httpx.AsyncClient, platform_key: str):  # type: ignore[no-untyped-def]
    """A fresh tenant created through the Stripe-configured API."""

    async def make() -> TenantKeys:
        return await create_tenant(billing_client, platform_key, prefix="bill")

    return make


def signed(
    event: dict[str, Any], *, secret: str = WEBHOOK_SECRET, at: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A webhook body and its ``Stripe-Signature`` header, signed with the SDK's own helper."""
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=at)
    return body.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


def event(
    type_: str, obj: dict[str, Any], event_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """A Stripe event envelope (the fields tuneloop reads, plus Stripe's usual ones)."""
    return {
        "id": event_id or f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": created or int(time.time()),
        "livemode": False,
        "type": type_,
        "data": {"object": obj},
    }


async def add_usage(
    backend: Backend, tenant_id: str, *quantities: int, meter: str = INFERENCE_TOKENS
) -> None:
    async with create_sessionmaker(backend.engine)() as session:
        for q in quantities:
            await record_usage(
                session,
                tenant_id=tenant_id,
                meter=meter,
                quantity=q,
                idempotency_key=f"test:{secrets.token_hex(8)}",
            )
        await session.commit()
