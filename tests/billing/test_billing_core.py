"""The ledger arithmetic in ``core.billing``: usage and cost per meter, run cost estimates and the
budget check, on both database backends."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update

from core.billing import (
    BillingConfig,
    InferenceGate,
    check_training_allowed,
    estimate_run_cost,
    month_start,
    usage_summary,
)
from core.db import create_sessionmaker
from core.errors import BillingSuspended, BudgetExceeded, NotFound
from core.models import BillingStatus, Feedback, Tenant, UsageRecord
from core.policy import TrainingPolicy
from core.usage import INFERENCE_TOKENS, TRAINING_TOKENS
from tests.billing.conftest import add_usage
from tests.conftest import Backend

PRICES = BillingConfig(
    price_inference_per_1k=Decimal("0.002"), price_training_per_1k=Decimal("0.01")
)


async def _tenant(backend: Backend, **policy: object) -> str:
    async with create_sessionmaker(backend.engine)() as session:
        tenant = Tenant(slug=f"b-{secrets.token_hex(5)}", name="billing", policy=dict(policy))
        session.add(tenant)
        await session.commit()
        return tenant.id


async def test_summary_prices_each_meter_and_counts_reporting(backend: Backend) -> None:
    tenant_id = await _tenant(backend)
    other = await _tenant(backend)
    await add_usage(backend, tenant_id, 1500, meter=INFERENCE_TOKENS)
    await add_usage(backend, tenant_id, 500, meter=INFERENCE_TOKENS)
    await add_usage(backend, tenant_id, 10_000, meter=TRAINING_TOKENS)
    await add_usage(backend, other, 999_999, meter=INFERENCE_TOKENS)  # never counted for tenant_id
    async with create_sessionmaker(backend.engine)() as session:
        # One row already reported, one from last month (outside the period).
        first = await session.scalar(
            select(UsageRecord.id).where(
                UsageRecord.tenant_id == tenant_id, UsageRecord.meter == TRAINING_TOKENS
            )
        )
        await session.execute(
            update(UsageRecord).where(UsageRecord.id == first).values(reported_at=datetime.now(UTC))
        )
        session.add(
            UsageRecord(
                tenant_id=tenant_id,
                meter=INFERENCE_TOKENS,
                quantity=7,
                idempotency_key=f"old:{secrets.token_hex(6)}",
                created_at=month_start() - timedelta(days=3),
            )
        )
        await session.commit()
        summary = await usage_summary(session, tenant_id=tenant_id, config=PRICES)

    inference, training = summary.meter(INFERENCE_TOKENS), summary.meter(TRAINING_TOKENS)
    assert (inference.quantity, inference.cost_usd) == (2000, Decimal("0.004"))
    assert (training.quantity, training.cost_usd) == (10_000, Decimal("0.1"))
    assert summary.total_cost_usd == Decimal("0.104")
    assert (training.reported_rows, training.unreported_rows) == (1, 0)
    assert (inference.reported_rows, inference.unreported_rows) == (0, 2)
    assert summary.period_start == month_start()
    assert summary.billing_status == "active" and summary.stripe_configured is False

    async with create_sessionmaker(backend.engine)() as session:
        whole = await usage_summary(
            session, tenant_id=tenant_id, since=month_start() - timedelta(days=40), config=PRICES
        )
    assert whole.meter(INFERENCE_TOKENS).quantity == 2007


async def test_summary_of_unknown_tenant_is_not_found(backend: Backend) -> None:
    async with create_sessionmaker(backend.engine)() as session:
        with pytest.raises(NotFound):
            await usage_summary(session, tenant_id="ten_nope")


async def _feedback(backend: Backend, tenant_id: str, n: int, words: int) -> None:
    async with create_sessionmaker(backend.engine)() as session:
        for i in range(n):
            session.add(
                Feedback(
                    tenant_id=tenant_id,
                    prompt="p" * (4 * words),  # 4 characters a token
                    completion="",
                    rating=1 if i % 2 else -1,
                )
            )
        await session.commit()


async def test_estimate_scales_with_feedback_epochs_and_max_steps(backend: Backend) -> None:
    tenant_id = await _tenant(backend, epochs=2.0)
    await _feedback(backend, tenant_id, n=10, words=100)  # 1,000 tokens of feedback
    async with create_sessionmaker(backend.engine)() as session:
        est = await estimate_run_cost(session, tenant_id=tenant_id, config=PRICES)
        assert (est.feedback_items, est.training_tokens) == (10, 2000)
        assert est.cost_usd == Decimal("0.02") and est.within_budget
        assert est.monthly_budget_usd is None
        capped = await estimate_run_cost(
            session,
            tenant_id=tenant_id,
            config=PRICES,
            policy=TrainingPolicy(epochs=2.0, max_steps=1),
        )
    assert capped.training_tokens == 400  # 100 tokens a row x 1 step x 4 rows a step
    async with create_sessionmaker(backend.engine)() as session:
        grpo = await estimate_run_cost(
            session, tenant_id=tenant_id, config=PRICES, policy=TrainingPolicy(method="grpo")
        )
        auto_may_pick_grpo = await estimate_run_cost(
            session,
            tenant_id=tenant_id,
            config=PRICES,
            policy=TrainingPolicy(grpo_min_questions=10),
        )
    # Four sampled answers per question over two epochs, and the judge's one reading.
    assert grpo.training_tokens == auto_may_pick_grpo.training_tokens == 2 * 1000 * 4 + 1000
    async with create_sessionmaker(backend.engine)() as session:
        one_step = {"epochs": 4.0, "grpo_max_steps": 1}
        grpo_capped = await estimate_run_cost(
            session,
            tenant_id=tenant_id,
            config=PRICES,
            policy=TrainingPolicy(method="grpo", **one_step),
        )
        auto_capped = await estimate_run_cost(
            session,
            tenant_id=tenant_id,
            config=PRICES,
            policy=TrainingPolicy(grpo_min_questions=10, **one_step),
        )
    # GRPO's cap: 100 tokens a question x 4 answers x 4 questions x 1 step, plus the judge's
    # reading. auto may still pick KTO, which the cap does not bound: 4 epochs x 1,000.
    assert grpo_capped.training_tokens == 100 * 4 * 4 + 1000
    assert auto_capped.training_tokens == 4 * 1000


async def test_budget_refuses_a_run_and_says_the_numbers(backend: Backend) -> None:
    tenant_id = await _tenant(backend, epochs=1.0, monthly_budget_usd=0.05)
    await _feedback(backend, tenant_id, n=10, words=300)  # 3,000 tokens: $0.03 a run
    await add_usage(backend, tenant_id, 5000, meter=INFERENCE_TOKENS)  # $0.01 spent
    async with create_sessionmaker(backend.engine)() as session:
        est = await check_training_allowed(session, tenant_id=tenant_id, config=PRICES)
        assert est.projected_usd == Decimal("0.04") and est.within_budget
    await add_usage(backend, tenant_id, 10_000, meter=INFERENCE_TOKENS)  # $0.03 spent now
    async with create_sessionmaker(backend.engine)() as session:
        with pytest.raises(BudgetExceeded) as refused:
            await check_training_allowed(session, tenant_id=tenant_id, config=PRICES)
    err = refused.value
    assert err.status == 402 and err.code == "budget_exceeded"
    assert "$0.03" in err.message and "$0.05" in err.message
    assert err.details == {
        "estimated_cost_usd": "0.030000",
        "estimated_training_tokens": 3000,
        "spent_usd": "0.030000",
        "monthly_budget_usd": "0.05",
    }


async def test_suspended_billing_refuses_training(backend: Backend) -> None:
    tenant_id = await _tenant(backend)
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, tenant_id)
        assert tenant is not None
        tenant.billing_status = BillingStatus.suspended
        tenant.billing_reason = "subscription sub_1 is past_due"
        await session.commit()
        with pytest.raises(BillingSuspended) as refused:
            await check_training_allowed(session, tenant_id=tenant_id)
    assert refused.value.status == 402 and refused.value.code == "billing_suspended"
    assert "sub_1 is past_due" in refused.value.message


async def test_inference_gate_memoizes_and_forgets(backend: Backend) -> None:
    """The hot path asks the database once per ``ttl`` per tenant; ``forget`` (what the webhook
    calls) makes a change count at once."""
    tenant_id = await _tenant(backend)
    config = BillingConfig(unpaid_blocks_inference=True)
    gate = InferenceGate(create_sessionmaker(backend.engine), config, ttl=3600)
    await gate.admit(tenant_id)
    async with create_sessionmaker(backend.engine)() as session:
        tenant = await session.get(Tenant, tenant_id)
        assert tenant is not None
        tenant.billing_status = BillingStatus.suspended
        await session.commit()
    await gate.admit(tenant_id)  # still the memo: no query was made
    gate.forget(tenant_id)
    for _ in range(2):  # refused, and refused again from the memo
        with pytest.raises(BillingSuspended) as refused:
            await gate.admit(tenant_id)
        assert "inference is suspended" in refused.value.message
