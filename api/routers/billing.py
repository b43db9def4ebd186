"""Usage and cost for tenant admins, and Stripe's webhook (authenticated by its signature)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import stripe
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from api.deps import AdminTenantDep, SessionDep, billing_config
from core.billing import (
    InferenceGate,
    MeterUsage,
    RunCostEstimate,
    estimate_run_cost,
    usage_summary,
)
from core.errors import DomainError, Unavailable
from core.stripe_billing import apply_webhook_event

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["billing"])


class MeterUsageOut(BaseModel):
    meter: str
    quantity: int
    price_per_1k_usd: Decimal
    cost_usd: Decimal
    reported_rows: int = Field(description="ledger rows Stripe has accepted")
    unreported_rows: int = Field(description="ledger rows not yet sent to Stripe")

    @classmethod
    def of(cls, m: MeterUsage) -> MeterUsageOut:
        return cls(
            meter=m.meter,
            quantity=m.quantity,
            price_per_1k_usd=m.price_per_1k_usd,
            cost_usd=m.cost_usd,
            reported_rows=m.reported_rows,
            unreported_rows=m.unreported_rows,
        )


class RunEstimateOut(BaseModel):
    feedback_items: int
    training_tokens: int
    cost_usd: Decimal
    projected_usd: Decimal = Field(description="this month's spending plus the run")
    within_budget: bool

    @classmethod
    def of(cls, e: RunCostEstimate) -> RunEstimateOut:
        return cls(
            feedback_items=e.feedback_items,
            training_tokens=e.training_tokens,
            cost_usd=e.cost_usd,
            projected_usd=e.projected_usd,
            within_budget=e.within_budget,
        )


class BillingOut(BaseModel):
    status: str = Field(description="active, or suspended while the subscription is unpaid")
    reason: str | None
    stripe_configured: bool
    stripe_customer_id: str | None


class UsageOut(BaseModel):
    object: Literal["usage"] = "usage"
    currency: Literal["usd"] = "usd"
    period_start: datetime
    meters: list[MeterUsageOut]
    total_cost_usd: Decimal
    monthly_budget_usd: Decimal | None
    billing: BillingOut
    next_run_estimate: RunEstimateOut = Field(
        description="what a personalization run started now would cost"
    )


@router.get("/usage")
async def get_usage(
    request: Request,
    session: SessionDep,
    tenant_id: AdminTenantDep,
    since: Annotated[
        datetime | None,
        Query(description="start of the period (ISO 8601); default: this calendar month, UTC"),
    ] = None,
) -> UsageOut:
    """Metered usage (inference and training tokens), its cost and how much of it Stripe has
    been sent, for the caller's tenant; plus the cost of a run started now."""
    config = billing_config(request)
    summary = await usage_summary(session, tenant_id=tenant_id, since=since, config=config)
    estimate = await estimate_run_cost(session, tenant_id=tenant_id, config=config)
    return UsageOut(
        period_start=summary.period_start,
        meters=[MeterUsageOut.of(m) for m in summary.meters],
        total_cost_usd=summary.total_cost_usd,
        monthly_budget_usd=summary.monthly_budget_usd,
        billing=BillingOut(
            status=summary.billing_status,
            reason=summary.billing_reason,
            stripe_configured=summary.stripe_configured,
            stripe_customer_id=summary.stripe_customer_id,
        ),
        next_run_estimate=RunEstimateOut.of(estimate),
    )


class WebhookAck(BaseModel):
    received: bool = True
    duplicate: bool
    action: str = Field(description="suspended, restored or ignored")


@router.post(
    "/billing/stripe/webhook",
    responses={
        400: {"description": "missing, wrong or stale Stripe-Signature, or not a Stripe event"},
        503: {"description": "STRIPE_WEBHOOK_SECRET is not set on this server"},
    },
)
async def stripe_webhook(request: Request, session: SessionDep) -> WebhookAck:
    """Stripe's events. No API key: the ``Stripe-Signature`` header over the raw body is the
    credential (checked by the Stripe SDK; stale or altered events are refused with 400). Each
    event id is acted on once; a lapsed subscription suspends the tenant's training (and, where
    the operator set ``TUNELOOP_UNPAID_BLOCKS_INFERENCE``, inference), payment restores it."""
    secret = request.app.state.settings.stripe_webhook_secret
    if not secret:
        raise Unavailable(
            "the Stripe webhook is not configured on this server: set STRIPE_WEBHOOK_SECRET",
            code="billing_not_configured",
        )
    payload = await request.body()  # the exact bytes Stripe signed, before any parsing
    try:
        # The SDK's default tolerance (5 minutes): an older signature may be a replay.
        event = stripe.Webhook.construct_event(
            payload, request.headers.get("stripe-signature"), secret
        )
        event_id, event_type = str(event["id"]), str(event["type"])
        created = datetime.fromtimestamp(int(event["created"]), UTC)
        obj: dict[str, Any] = event["data"]["object"].to_dict()
    except stripe.SignatureVerificationError as exc:
        raise DomainError(
            f"invalid Stripe signature: {exc.user_message or exc}", code="invalid_signature"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, OSError) as exc:
        # not an event (not JSON, or without the fields every event has)
        raise DomainError(f"not a Stripe event: {exc}", code="invalid_event") from None
    outcome = await apply_webhook_event(
        session, event_id=event_id, event_type=event_type, obj=obj, created=created
    )
    if outcome.tenant_id is not None:
        gate: InferenceGate = request.app.state.inference_gate
        gate.forget(outcome.tenant_id)
    return WebhookAck(duplicate=outcome.duplicate, action=outcome.action)
