"""Stripe, through its SDK: the catalog (Billing Meters, one product, metered prices), a customer
and subscription per tenant, meter events from the ledger, and webhook events applied to tenants.

Everything is optional: without ``STRIPE_API_KEY`` nothing here is built and the ledger alone
keeps the numbers. Base addresses can be overridden (``STRIPE_API_BASE``,
``STRIPE_METER_EVENTS_BASE``) for a proxy or the test suite's fake Stripe.

Exactly-once reporting rests on two Stripe features used together: each ledger row is sent with
its row id as the meter event's ``identifier`` (Stripe counts one event per identifier) and as
the request's ``Idempotency-Key`` (a resend replays Stripe's first answer). A row is marked
reported only after Stripe accepted it; a crash in between means a resend, with the same body,
that Stripe dedupes. Both guarantees hold for at least 24 hours, and the reporter retries every
minute.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import stripe
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.billing import METERS, BillingConfig
from core.db import upsert_insert
from core.errors import NotFound
from core.models import BillingStatus, StripeEvent, Tenant, UsageRecord
from core.settings import Settings

__all__ = [
    "EVENT_NAMES",
    "Catalog",
    "ReportOutcome",
    "StripeBilling",
    "StripeMisconfigured",
    "WebhookOutcome",
    "apply_webhook_event",
]

log = logging.getLogger(__name__)

EVENT_NAMES = {meter: f"tuneloop_{meter}" for meter in METERS}
"""Meter -> the ``event_name`` of its Stripe Billing Meter."""
PRODUCT_ID = "tuneloop_usage"
"""The one Stripe product the metered prices belong to (a fixed id makes setup idempotent)."""
# Stripe refuses meter events dated more than 35 days back. Each row is sent dated when it was
# recorded, always the same body under its idempotency key (a changed body under a reused key is
# an IdempotencyError). A row older than this (a day short of Stripe's limit, so a send in flight
# still lands in time) is not sent at all: it stays unreported and logged for the operator, who
# bills it by other means (an invoice item) or lets it go.
MAX_EVENT_AGE = timedelta(days=34)
# Meter events in flight at once per batch: Stripe's v1 meter events endpoint is rate limited
# per account; a few at a time keeps a backlog moving without tripping 429s.
_CONCURRENCY = 8

_SUSPENDING = {"past_due", "unpaid", "canceled", "incomplete_expired", "paused"}
_PAID = {"active", "trialing"}


def price_lookup_key(meter: str) -> str:
    return f"tuneloop_{meter}"


@dataclass(frozen=True)
class Catalog:
    """Ids of what ``StripeBilling.catalog`` made sure exists."""

    meters: dict[str, str]
    """Meter name -> Stripe meter id."""
    prices: dict[str, str]
    """Meter name -> Stripe price id (metered, monthly)."""


@dataclass(frozen=True)
class ReportOutcome:
    """One reporting pass over (part of) the ledger."""

    sent: int
    """Rows Stripe accepted and that are now marked reported."""
    pending: int
    """Rows that could not be sent this time (no customer yet, or Stripe refused)."""
    last_id: str | None = None
    """The largest row id looked at: where the next page starts."""
    retryable: str | None = None
    """Set when Stripe was unreachable or busy: the caller should retry (with backoff)."""


class StripeMisconfigured(Exception):
    """Stripe refused the API key itself (401) or its permissions (403): no request will
    succeed until the operator fixes ``STRIPE_API_KEY``, so the pass stops at once."""


@dataclass(frozen=True)
class _Row:
    """A ledger row as plain values (a rollback while provisioning expires ORM objects)."""

    id: str
    tenant_id: str
    meter: str
    quantity: int
    created_at: datetime
    customer_id: str | None
    subscription_id: str | None


class StripeBilling:
    """The Stripe side of billing for one process: an SDK client and the catalog it set up."""

    def __init__(
        self,
        client: stripe.StripeClient,
        config: BillingConfig,
        http_client: stripe.HTTPXClient | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self._http = http_client
        self._catalog: Catalog | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeBilling | None:
        """None without ``STRIPE_API_KEY``."""
        if not settings.stripe_api_key:
            return None
        bases: dict[str, str] = {}
        if settings.stripe_api_base:
            bases["api"] = settings.stripe_api_base.rstrip("/")
        if settings.stripe_meter_events_base:
            bases["meter_events"] = settings.stripe_meter_events_base.rstrip("/")
        http = stripe.HTTPXClient()
        client = stripe.StripeClient(
            settings.stripe_api_key,
            base_addresses=bases,  # type: ignore[arg-type]
            http_client=http,
            # No retries in the SDK: the reporter is retried by Temporal with backoff, and
            # provisioning by the next reporting pass; both resend with the same keys.
            max_network_retries=0,
        )
        return cls(client, BillingConfig.from_settings(settings), http)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()

    # --- catalog ------------------------------------------------------------------------------

    async def catalog(self) -> Catalog:
        """Make sure the meters, the product and one metered price per meter exist (idempotent:
        found by event name, product id and price lookup key); cached for the process.

        A price whose amount differs from the configured one is replaced by a new price that
        takes over the lookup key; existing subscriptions keep their price until moved."""
        async with self._lock:
            if self._catalog is None:
                self._catalog = await self._ensure_catalog()
            return self._catalog

    async def _ensure_catalog(self) -> Catalog:
        v1 = self.client.v1
        page = await v1.billing.meters.list_async({"status": "active", "limit": 100})
        existing = {m.event_name: m.id async for m in page.auto_paging_iter()}
        meters: dict[str, str] = {}
        for meter in METERS:
            event = EVENT_NAMES[meter]
            if event not in existing:
                created = await v1.billing.meters.create_async(
                    {
                        "display_name": f"tuneloop {meter.replace('_', ' ')}",
                        "event_name": event,
                        "default_aggregation": {"formula": "sum"},
                        "customer_mapping": {
                            "event_payload_key": "stripe_customer_id",
                            "type": "by_id",
                        },
                        "value_settings": {"event_payload_key": "value"},
                    },
                    {"idempotency_key": f"tuneloop-meter-{event}"},
                )
                existing[event] = created.id
            meters[meter] = existing[event]
        try:
            await v1.products.retrieve_async(PRODUCT_ID)
        except stripe.InvalidRequestError:
            await v1.products.create_async(
                {"id": PRODUCT_ID, "name": "tuneloop usage"},
                {"idempotency_key": f"tuneloop-product-{PRODUCT_ID}"},
            )
        found = {
            p.lookup_key: p
            for p in (
                await v1.prices.list_async(
                    {"lookup_keys": [price_lookup_key(m) for m in METERS], "active": True}
                )
            ).data
        }
        prices: dict[str, str] = {}
        for meter in METERS:
            amount = self.unit_amount_cents(meter)
            price = found.get(price_lookup_key(meter))
            same = price is not None and Decimal(str(price.unit_amount_decimal)) == amount
            if price is None or not same:
                # Named by what it replaces and what it becomes: a retry of this change (a crash
                # before the answer) reuses the price instead of making a second one.
                replaces = "none" if price is None else price.id
                price = await v1.prices.create_async(
                    {
                        "currency": "usd",
                        "product": PRODUCT_ID,
                        "unit_amount_decimal": amount,
                        "recurring": {
                            "interval": "month",
                            "usage_type": "metered",
                            "meter": meters[meter],
                        },
                        "lookup_key": price_lookup_key(meter),
                        "transfer_lookup_key": True,
                        "nickname": f"tuneloop {meter.replace('_', ' ')} per token",
                    },
                    {"idempotency_key": f"tuneloop-price-{meters[meter]}-{amount}-{replaces}"},
                )
            prices[meter] = price.id
        return Catalog(meters=meters, prices=prices)

    def unit_amount_cents(self, meter: str) -> Decimal:
        """Stripe's unit amount: US cents per token (a price per 1k USD x 100 / 1000)."""
        return (self.config.price_per_1k(meter) / 10).normalize()

    # --- tenants ------------------------------------------------------------------------------

    async def provision(self, session: AsyncSession, *, tenant_id: str) -> Tenant:
        """Give the tenant a Stripe customer and a subscription to the metered prices, each
        stored (committed) as soon as Stripe made it. Idempotent: what exists is kept, and the
        creations carry idempotency keys, so a retry after a crash creates nothing twice."""
        tenant = await session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        if tenant.stripe_customer_id is None:
            customer = await self.client.v1.customers.create_async(
                {
                    "name": tenant.name,
                    "metadata": {"tenant_id": tenant.id, "tenant_slug": tenant.slug},
                },
                {"idempotency_key": f"tuneloop-customer-{tenant.id}"},
            )
            tenant.stripe_customer_id = customer.id
            await session.commit()
        if tenant.stripe_subscription_id is None:
            catalog = await self.catalog()
            subscription = await self.client.v1.subscriptions.create_async(
                {
                    "customer": tenant.stripe_customer_id,
                    "items": [{"price": catalog.prices[m]} for m in METERS],
                    "metadata": {"tenant_id": tenant.id},
                },
                {"idempotency_key": f"tuneloop-subscription-{tenant.id}"},
            )
            tenant.stripe_subscription_id = subscription.id
            await session.commit()
        return tenant

    async def provision_quietly(self, session: AsyncSession, *, tenant_id: str) -> bool:
        """``provision``, but a Stripe failure only logs: the tenant exists either way and the
        next reporting pass (or ``tuneloop billing setup``) creates what is missing (customer,
        subscription or both). True on success."""
        try:
            await self.provision(session, tenant_id=tenant_id)
        except stripe.StripeError as exc:
            await session.rollback()
            log.warning("Stripe customer for tenant %s not created yet: %s", tenant_id, exc)
            return False
        return True

    async def provision_missing(self, session: AsyncSession) -> list[str]:
        """Provision every tenant without a customer or subscription; the ids that still lack
        one (Stripe failed for them) are returned."""
        ids = list(
            await session.scalars(
                select(Tenant.id).where(
                    Tenant.stripe_customer_id.is_(None) | Tenant.stripe_subscription_id.is_(None)
                )
            )
        )
        return [t for t in ids if not await self.provision_quietly(session, tenant_id=t)]

    # --- meter events -------------------------------------------------------------------------

    async def report(
        self, session: AsyncSession, *, limit: int = 200, after: str | None = None
    ) -> ReportOutcome:
        """Send up to ``limit`` unreported ledger rows as meter events, oldest first, and mark
        the accepted ones reported (one UPDATE, after Stripe answered).

        Tenants without a Stripe customer or subscription are provisioned first; their rows are
        sent only once the subscription exists (a row of a customer with no subscription would
        be metered but never invoiced), and stay pending until then. A refusal of one row
        (Stripe 400, or a row past Stripe's age limit) leaves it pending and logged; unreachable
        or busy Stripe (connection errors, 429, 5xx) is reported back as ``retryable`` after
        marking what did go through. A key Stripe refuses (401, 403) raises
        ``StripeMisconfigured`` without sending the rest."""
        rows = [
            _Row(*r)
            for r in await session.execute(
                select(
                    UsageRecord.id,
                    UsageRecord.tenant_id,
                    UsageRecord.meter,
                    UsageRecord.quantity,
                    UsageRecord.created_at,
                    Tenant.stripe_customer_id,
                    Tenant.stripe_subscription_id,
                )
                .join(Tenant, Tenant.id == UsageRecord.tenant_id)
                .where(UsageRecord.reported_at.is_(None), UsageRecord.id > (after or ""))
                .order_by(UsageRecord.id)
                .limit(limit)
            )
        ]
        await session.commit()  # no transaction held open while Stripe is called
        customers = {
            r.tenant_id: r.customer_id
            for r in rows
            if r.customer_id is not None and r.subscription_id is not None
        }
        for tenant_id in sorted({r.tenant_id for r in rows} - set(customers)):
            try:
                tenant = await self.provision(session, tenant_id=tenant_id)
            except (stripe.AuthenticationError, stripe.PermissionError) as exc:
                raise StripeMisconfigured(str(exc)) from exc
            except stripe.StripeError as exc:
                await session.rollback()
                log.warning("Stripe subscription for tenant %s not created yet: %s", tenant_id, exc)
                continue
            if tenant.stripe_customer_id is not None and tenant.stripe_subscription_id is not None:
                customers[tenant_id] = tenant.stripe_customer_id
        await session.commit()  # nor one that provisioning opened to read
        oldest = datetime.now(UTC) - MAX_EVENT_AGE
        too_old = [r.id for r in rows if r.tenant_id in customers and r.created_at < oldest]
        if too_old:
            log.error(
                "%d usage rows are older than %s and are not sent to Stripe, which refuses meter "
                "events that old; bill them by other means. First: %s",
                len(too_old),
                MAX_EVENT_AGE,
                too_old[0],
            )
        todo = [r for r in rows if r.tenant_id in customers and r.created_at >= oldest]
        semaphore = asyncio.Semaphore(_CONCURRENCY)
        misconfigured: list[stripe.StripeError] = []

        async def send(row: _Row) -> bool:
            async with semaphore:
                if misconfigured:
                    return False  # the key is refused: the rest would be refused too
                try:
                    await self.send_meter_event(row, customers[row.tenant_id])
                except (stripe.AuthenticationError, stripe.PermissionError) as exc:
                    misconfigured.append(exc)
                    raise
                return True

        results = await asyncio.gather(*(send(r) for r in todo), return_exceptions=True)
        accepted: list[str] = []
        retryable: str | None = None
        for row, result in zip(todo, results, strict=True):
            if result is True:
                accepted.append(row.id)
            elif result is False or isinstance(
                result, stripe.AuthenticationError | stripe.PermissionError
            ):
                pass
            elif isinstance(result, stripe.InvalidRequestError | stripe.IdempotencyError):
                log.error("Stripe refused usage row %s: %s", row.id, result)
            elif isinstance(result, stripe.StripeError):
                retryable = retryable or f"{type(result).__name__}: {result}"
            else:
                raise result
        await self.mark_reported(session, accepted)
        if misconfigured:
            raise StripeMisconfigured(str(misconfigured[0])) from misconfigured[0]
        return ReportOutcome(
            sent=len(accepted),
            pending=len(rows) - len(accepted),
            last_id=rows[-1].id if rows else None,
            retryable=retryable,
        )

    async def send_meter_event(self, row: _Row, customer_id: str) -> None:
        """One ledger row -> one meter event; the row id is the identifier and the idempotency
        key, and the body depends only on the row, so sending the same row again is counted
        once by Stripe."""
        await self.client.v1.billing.meter_events.create_async(
            {
                "event_name": EVENT_NAMES[row.meter],
                "identifier": row.id,
                "timestamp": int(row.created_at.timestamp()),
                "payload": {"stripe_customer_id": customer_id, "value": str(row.quantity)},
            },
            {"idempotency_key": f"tuneloop-usage-{row.id}"},
        )

    @staticmethod
    async def mark_reported(session: AsyncSession, ids: Sequence[str]) -> None:
        if not ids:
            return
        await session.execute(
            update(UsageRecord)
            .where(UsageRecord.id.in_(ids), UsageRecord.reported_at.is_(None))
            .values(reported_at=datetime.now(UTC))
        )
        await session.commit()


# --- webhooks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookOutcome:
    duplicate: bool
    """The event id was seen before: nothing was done again."""
    action: str
    """``suspended``, ``restored`` or ``ignored``."""
    tenant_id: str | None = None


def _status_change(event_type: str, obj: dict[str, Any]) -> tuple[BillingStatus, str] | None:
    """What an event means for the tenant's billing status (None: nothing)."""
    if event_type in (
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    ):
        status = "canceled" if event_type.endswith("deleted") else str(obj.get("status"))
        if status in _SUSPENDING:
            return BillingStatus.suspended, f"subscription {obj.get('id')} is {status}"
        if status in _PAID:
            return BillingStatus.active, f"subscription {obj.get('id')} is {status}"
        return None  # incomplete: the first payment is still being attempted
    if event_type == "invoice.payment_failed":
        return BillingStatus.suspended, f"payment of invoice {obj.get('id')} failed"
    if event_type == "invoice.paid":
        return BillingStatus.active, f"invoice {obj.get('id')} was paid"
    return None


def _subscription_of(event_type: str, obj: dict[str, Any]) -> str | None:
    """The subscription an event is about: the object itself, or an invoice's subscription
    (``parent.subscription_details.subscription`` since API version 2025-03-31, top-level
    ``subscription`` before)."""
    if event_type.startswith("customer.subscription."):
        found: Any = obj.get("id")
    else:
        parent = obj.get("parent")
        details = parent.get("subscription_details") if isinstance(parent, dict) else None
        found = details.get("subscription") if isinstance(details, dict) else None
        found = found or obj.get("subscription")
    if isinstance(found, dict):  # expanded
        found = found.get("id")
    return found if isinstance(found, str) else None


async def apply_webhook_event(
    session: AsyncSession,
    *,
    event_id: str,
    event_type: str,
    obj: dict[str, Any],
    created: datetime,
) -> WebhookOutcome:
    """Apply one verified Stripe event to the tenant whose customer it names, exactly once: the
    event id is stored (``stripe_events``) in the same transaction as the change it causes, so
    a redelivered event does nothing and a failed one is retried whole by Stripe.

    Stripe does not promise delivery order: an event ``created`` before the one the tenant's
    status came from is recorded but changes nothing (``action="ignored"``). Only the tenant's
    own subscription counts: events about another subscription of the same customer (an old
    one, one made by hand in Stripe's dashboard) or about its invoices are recorded and
    ignored."""
    inserted = await session.execute(
        upsert_insert(session)(StripeEvent)
        .values(id=event_id, type=event_type[:128], processed_at=datetime.now(UTC))
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(StripeEvent.id)
    )
    if inserted.first() is None:
        await session.rollback()
        return WebhookOutcome(duplicate=True, action="ignored")
    change = _status_change(event_type, obj)
    customer = obj.get("customer")
    tenant = None
    if change is not None and isinstance(customer, str):
        # Locked until the commit: of two events for one tenant handled at once, the older one
        # waits and then sees the newer one's time (Postgres; SQLite serializes writers).
        tenant = await session.scalar(
            select(Tenant).where(Tenant.stripe_customer_id == customer).with_for_update()
        )
    ours = tenant is not None and (
        tenant.stripe_subscription_id is not None
        and _subscription_of(event_type, obj) == tenant.stripe_subscription_id
    )
    stale = tenant is not None and (
        tenant.billing_event_at is not None and created < tenant.billing_event_at
    )
    if change is None or tenant is None or not ours or stale:
        await session.commit()  # recorded, so a redelivery is not looked at again
        return WebhookOutcome(duplicate=False, action="ignored")
    status, reason = change
    tenant.billing_status = status
    tenant.billing_reason = reason if status is BillingStatus.suspended else None
    tenant.billing_event_at = created
    await session.commit()
    log.info("tenant %s billing %s: %s", tenant.id, status.value, reason)
    action = "suspended" if status is BillingStatus.suspended else "restored"
    return WebhookOutcome(duplicate=False, action=action, tenant_id=tenant.id)
