"""Billing over the usage ledger: prices, a tenant's usage and cost, run cost estimates, and the
checks that keep a tenant within its own budget and its paid subscription.

The ledger (``usage_records``) is the source of truth. Stripe hears about it later (the
``ReportUsage`` workflow); nothing here talks to Stripe, so all of it works without Stripe.

Money is ``Decimal`` USD throughout (never floats); costs keep six decimals, which is finer than
any invoice line, and are rounded only for display.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import String, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import BillingSuspended, BudgetExceeded, InvalidInput, NotFound
from core.models import BillingStatus, Feedback, Interaction, Tenant, UsageRecord
from core.policy import TrainingPolicy, policy_of
from core.settings import Settings
from core.usage import INFERENCE_TOKENS, TRAINING_TOKENS

__all__ = [
    "METERS",
    "BillingConfig",
    "InferenceGate",
    "MeterUsage",
    "RunCostEstimate",
    "UsageSummary",
    "check_training_allowed",
    "estimate_run_cost",
    "month_start",
    "usage_summary",
]

METERS = (INFERENCE_TOKENS, TRAINING_TOKENS)
"""Every meter, in display order. Each one is a Stripe Billing Meter when Stripe is configured."""

_MICRO = Decimal("0.000001")
# Rows a training step sees; RunOptions.batch_size's default (the policy does not change it).
_TRAIN_BATCH = 4
# Answers GRPO samples per question; TrainSpec.num_generations' default (the policy does not
# change it). A GRPO run generates and trains on that many answers for every question it sees.
_GRPO_ANSWERS = 4
# Characters per token for feedback that carries its own text (no interaction to count from):
# the usual rule of thumb for English with BPE tokenizers.
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class BillingConfig:
    """Prices and the operator's billing switches; build it with ``from_settings``."""

    price_inference_per_1k: Decimal = Decimal("0.002")
    """USD per 1,000 inference tokens (TUNELOOP_PRICE_INFERENCE_PER_1K_TOKENS)."""
    price_training_per_1k: Decimal = Decimal("0.01")
    """USD per 1,000 training tokens (TUNELOOP_PRICE_TRAINING_PER_1K_TOKENS)."""
    stripe_configured: bool = False
    """STRIPE_API_KEY is set: usage is reported to Stripe."""
    unpaid_blocks_inference: bool = False
    """A lapsed subscription stops inference too (TUNELOOP_UNPAID_BLOCKS_INFERENCE)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> BillingConfig:
        return cls(
            price_inference_per_1k=settings.price_inference_per_1k,
            price_training_per_1k=settings.price_training_per_1k,
            stripe_configured=settings.stripe_configured,
            unpaid_blocks_inference=settings.unpaid_blocks_inference,
        )

    def price_per_1k(self, meter: str) -> Decimal:
        if meter == INFERENCE_TOKENS:
            return self.price_inference_per_1k
        if meter == TRAINING_TOKENS:
            return self.price_training_per_1k
        raise ValueError(f"unknown meter {meter!r}")

    def cost(self, meter: str, quantity: int) -> Decimal:
        """USD for ``quantity`` units of ``meter``, to six decimals."""
        return (Decimal(quantity) * self.price_per_1k(meter) / 1000).quantize(_MICRO)


def _aware(moment: datetime) -> datetime:
    """``moment`` in UTC; a time without a zone is taken as UTC (what an ISO date in a query
    string means here)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+05:00 is before year 1 in UTC
        raise InvalidInput(
            f"{moment.isoformat()} is out of range", details={"field": "since"}
        ) from None


def month_start(now: datetime | None = None) -> datetime:
    """Midnight UTC on the first day of ``now``'s month: where budgets and summaries start."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class MeterUsage:
    meter: str
    quantity: int
    """Units (tokens) recorded since the period start."""
    price_per_1k_usd: Decimal
    cost_usd: Decimal
    reported_rows: int
    """Ledger rows Stripe has accepted."""
    unreported_rows: int
    """Ledger rows still waiting to be sent (always all of them without Stripe)."""


@dataclass(frozen=True)
class UsageSummary:
    """A tenant's metered usage and cost since ``period_start`` (what ``GET /v1/usage`` and the
    dashboard show)."""

    tenant_id: str
    period_start: datetime
    meters: tuple[MeterUsage, ...]
    """One entry per meter in ``METERS`` order, zeros included."""
    total_cost_usd: Decimal
    reported_rows: int
    unreported_rows: int
    billing_status: str
    """``active``, or ``suspended`` while the Stripe subscription is unpaid."""
    billing_reason: str | None
    stripe_customer_id: str | None
    stripe_configured: bool
    monthly_budget_usd: Decimal | None
    """The tenant's own cap per calendar month (None: none)."""

    def meter(self, name: str) -> MeterUsage:
        return next(m for m in self.meters if m.meter == name)


async def _tenant(session: AsyncSession, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return tenant


def _budget(policy: TrainingPolicy) -> Decimal | None:
    # The policy stores a float (JSON); str() keeps 12.3 as 12.3, not 12.2999999...
    return None if policy.monthly_budget_usd is None else Decimal(str(policy.monthly_budget_usd))


async def _per_meter(
    session: AsyncSession, tenant_id: str, since: datetime
) -> dict[str, tuple[int, int, int]]:
    """meter -> (quantity, reported rows, unreported rows) since ``since``."""
    unreported = func.sum(case((UsageRecord.reported_at.is_(None), 1), else_=0))
    rows = await session.execute(
        select(
            UsageRecord.meter,
            func.coalesce(func.sum(UsageRecord.quantity), 0),
            func.count(),
            func.coalesce(unreported, 0),
        )
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.created_at >= since)
        .group_by(UsageRecord.meter)
    )
    return {m: (int(q), int(n) - int(u), int(u)) for m, q, n, u in rows}


async def _spent(
    session: AsyncSession, tenant_id: str, since: datetime, config: BillingConfig
) -> Decimal:
    per_meter = await _per_meter(session, tenant_id, since)
    return sum((config.cost(m, q) for m, (q, _, _) in per_meter.items() if m in METERS), Decimal(0))


async def usage_summary(
    session: AsyncSession,
    *,
    tenant_id: str,
    since: datetime | None = None,
    config: BillingConfig | None = None,
) -> UsageSummary:
    """The tenant's usage per meter, its cost and reporting state since ``since`` (default: the
    start of the current calendar month, UTC; a ``since`` without a time zone is UTC).

    ``config`` carries prices and whether Stripe is configured; pass
    ``BillingConfig.from_settings(settings)`` (the API keeps one as ``app.state.billing``).
    Left out, the default prices apply and Stripe counts as not configured.
    Raises ``NotFound`` for an unknown tenant. Two small queries; reads only this tenant's rows.
    """
    config = config or BillingConfig()
    tenant = await _tenant(session, tenant_id)
    period_start = month_start() if since is None else _aware(since)
    per_meter = await _per_meter(session, tenant_id, period_start)
    meters = tuple(
        MeterUsage(
            meter=m,
            quantity=per_meter.get(m, (0, 0, 0))[0],
            price_per_1k_usd=config.price_per_1k(m),
            cost_usd=config.cost(m, per_meter.get(m, (0, 0, 0))[0]),
            reported_rows=per_meter.get(m, (0, 0, 0))[1],
            unreported_rows=per_meter.get(m, (0, 0, 0))[2],
        )
        for m in METERS
    )
    return UsageSummary(
        tenant_id=tenant_id,
        period_start=period_start,
        meters=meters,
        total_cost_usd=sum((m.cost_usd for m in meters), Decimal(0)),
        reported_rows=sum(m.reported_rows for m in meters),
        unreported_rows=sum(m.unreported_rows for m in meters),
        billing_status=tenant.billing_status.value,
        billing_reason=tenant.billing_reason,
        stripe_customer_id=tenant.stripe_customer_id,
        stripe_configured=config.stripe_configured,
        monthly_budget_usd=_budget(policy_of(tenant.policy)),
    )


@dataclass(frozen=True)
class RunCostEstimate:
    """What a personalization run would cost, next to the month's spending and the cap."""

    tenant_id: str
    feedback_items: int
    training_tokens: int
    """Estimated training tokens (the meter the run records when it ends)."""
    price_per_1k_usd: Decimal
    cost_usd: Decimal
    spent_usd: Decimal
    """Cost of all usage this calendar month so far."""
    monthly_budget_usd: Decimal | None
    projected_usd: Decimal
    """``spent_usd + cost_usd``."""
    within_budget: bool
    """False when a cap is set and ``projected_usd`` would pass it."""


async def estimate_run_cost(
    session: AsyncSession,
    *,
    tenant_id: str,
    config: BillingConfig | None = None,
    policy: TrainingPolicy | None = None,
) -> RunCostEstimate:
    """Estimate what a run would cost now, before it starts (shown by the dashboard's run
    button; enforced by ``check_training_allowed``).

    Training tokens are estimated as ``epochs`` times the tokens of the tenant's feedback (an
    interaction's counted tokens when the feedback rates one, else its text's length / 4),
    limited by ``max_steps`` times the batch size. That errs high: the meter counts DPO/KTO in
    words, which are fewer than model tokens. A run that may train with GRPO (``grpo``, or
    ``auto`` with at least ``grpo_min_questions`` feedback items) is estimated as generating
    ``_GRPO_ANSWERS`` answers as long as the served ones for every question, for at most
    ``grpo_max_steps`` steps when ``max_steps`` is unset, plus one reading of the feedback by
    the judge; GRPO is metered in model tokens. ``auto`` may still pick KTO or DPO, so it is
    estimated as the larger of the two. ``policy`` defaults to the tenant's stored policy;
    ``config`` as in ``usage_summary``. Raises ``NotFound`` for an unknown tenant.
    """
    config = config or BillingConfig()
    tenant = await _tenant(session, tenant_id)
    policy = policy or policy_of(tenant.policy)
    # An inline item carries a prompt or messages: the prompt when given, else the messages'
    # JSON (not both: the bulk insert stores absent messages as JSON ``null``, not SQL NULL).
    inline_chars = func.coalesce(
        func.length(Feedback.prompt), func.length(cast(Feedback.messages, String)), 0
    ) + func.coalesce(func.length(Feedback.completion), 0)
    size = case(
        (
            Interaction.id.is_not(None),
            Interaction.prompt_tokens + Interaction.completion_tokens,
        ),
        else_=inline_chars / _CHARS_PER_TOKEN,
    )
    count, total = (
        await session.execute(
            select(func.count(Feedback.id), func.coalesce(func.sum(size), 0))
            .select_from(Feedback)
            .outerjoin(Interaction, Interaction.id == Feedback.interaction_id)
            .where(Feedback.tenant_id == tenant_id)
        )
    ).one()
    count, total = int(count), int(total)
    grpo = policy.method == "grpo" or (
        policy.method == "auto" and count >= policy.grpo_min_questions
    )

    def trained(per_row: int, steps: int | None) -> int:
        tokens = math.ceil(policy.epochs * total * per_row)
        if steps is not None and count:
            tokens = min(tokens, math.ceil(total / count * steps * _TRAIN_BATCH * per_row))
        return tokens

    tokens = trained(1, policy.max_steps)
    if grpo:
        # auto may still pick KTO or DPO, which grpo_max_steps does not cap: the larger.
        grpo_steps = policy.max_steps if policy.max_steps is not None else policy.grpo_max_steps
        grpo_tokens = trained(_GRPO_ANSWERS, grpo_steps) + total  # the judge reads it once
        tokens = grpo_tokens if policy.method == "grpo" else max(tokens, grpo_tokens)
    cost = config.cost(TRAINING_TOKENS, tokens)
    spent = await _spent(session, tenant_id, month_start(), config)
    budget = _budget(policy)
    return RunCostEstimate(
        tenant_id=tenant_id,
        feedback_items=count,
        training_tokens=tokens,
        price_per_1k_usd=config.price_training_per_1k,
        cost_usd=cost,
        spent_usd=spent,
        monthly_budget_usd=budget,
        projected_usd=spent + cost,
        within_budget=budget is None or spent + cost <= budget,
    )


def _usd(value: Decimal) -> str:
    return f"${value.quantize(Decimal('0.01'))}"


def _suspended(tenant: Tenant, what: str) -> BillingSuspended:
    why = tenant.billing_reason or "the Stripe subscription is not paid"
    return BillingSuspended(
        f"{what} is suspended for this tenant: {why}. Pay the open invoice in Stripe (or ask the "
        "operator); it resumes as soon as Stripe reports the payment",
        details={"billing_status": tenant.billing_status.value, "reason": tenant.billing_reason},
    )


async def check_training_allowed(
    session: AsyncSession,
    *,
    tenant_id: str,
    config: BillingConfig | None = None,
    policy: TrainingPolicy | None = None,
) -> RunCostEstimate:
    """Refuse a run of a tenant whose subscription lapsed (``BillingSuspended``, 402) or whose
    estimated cost would pass its monthly budget (``BudgetExceeded``, 402, with the numbers);
    return the estimate otherwise."""
    tenant = await _tenant(session, tenant_id)
    if tenant.billing_status is BillingStatus.suspended:
        raise _suspended(tenant, "training")
    estimate = await estimate_run_cost(session, tenant_id=tenant_id, config=config, policy=policy)
    if not estimate.within_budget:
        assert estimate.monthly_budget_usd is not None
        raise BudgetExceeded(
            f"this run would cost about {_usd(estimate.cost_usd)} "
            f"({estimate.training_tokens} training tokens); {_usd(estimate.spent_usd)} is "
            f"already spent this month and the monthly budget is "
            f"{_usd(estimate.monthly_budget_usd)}. Raise monthly_budget_usd (PUT /v1/policy), "
            "lower epochs or max_steps, or wait for next month",
            details={
                "estimated_cost_usd": str(estimate.cost_usd),
                "estimated_training_tokens": estimate.training_tokens,
                "spent_usd": str(estimate.spent_usd),
                "monthly_budget_usd": str(estimate.monthly_budget_usd),
            },
        )
    return estimate


class InferenceGate:
    """Per-process memo of a tenant's inference admission, refreshed every ``ttl`` seconds: its
    training policy (which also decides the base-model fallback) and whether billing refuses it.

    Inference is the hot path: admission costs a dict lookup per request and the database is
    asked at most once per ``ttl`` per tenant (one row, plus the month's spending only for a
    tenant whose policy blocks inference over budget). The webhook and policy changes
    ``forget`` a tenant at once in the process that handles them; other processes notice within
    ``ttl``.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        config: BillingConfig,
        ttl: float = 5.0,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.config = config
        self.ttl = ttl
        self._memo: dict[
            str, tuple[float, TrainingPolicy, BillingSuspended | BudgetExceeded | None]
        ] = {}

    def forget(self, tenant_id: str) -> None:
        self._memo.pop(tenant_id, None)

    async def admit(self, tenant_id: str) -> TrainingPolicy:
        """The tenant's policy (as of at most ``ttl`` ago) for the request about to be served;
        raises ``BillingSuspended`` / ``BudgetExceeded`` (402) when inference is refused."""
        hit = self._memo.get(tenant_id)
        if hit is None or hit[0] < time.monotonic():
            async with self.sessionmaker() as session:
                policy, refusal = await self._decide(session, tenant_id)
            hit = (time.monotonic() + self.ttl, policy, refusal)
            self._memo[tenant_id] = hit
        _, policy, refusal = hit
        if refusal is not None:
            # A fresh exception each time: re-raising one instance would grow its traceback.
            raise type(refusal)(refusal.message, details=refusal.details)
        return policy

    async def _decide(
        self, session: AsyncSession, tenant_id: str
    ) -> tuple[TrainingPolicy, BillingSuspended | BudgetExceeded | None]:
        tenant = await session.get(Tenant, tenant_id)
        if tenant is None:  # authentication already vouched for it; a deleted tenant 404s later
            return TrainingPolicy(), None
        policy = policy_of(tenant.policy)
        if tenant.billing_status is BillingStatus.suspended and self.config.unpaid_blocks_inference:
            return policy, _suspended(tenant, "inference")
        budget = _budget(policy)
        if budget is None or policy.inference_over_budget == "allow":
            return policy, None
        spent = await _spent(session, tenant_id, month_start(), self.config)
        if spent < budget:
            return policy, None
        return policy, BudgetExceeded(
            f"this month's spending ({_usd(spent)}) reached the monthly budget of {_usd(budget)} "
            "and the policy blocks inference over budget. Raise monthly_budget_usd or set "
            "inference_over_budget to 'allow' (PUT /v1/policy)",
            details={"spent_usd": str(spent), "monthly_budget_usd": str(budget)},
        )
