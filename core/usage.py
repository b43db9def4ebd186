"""The usage ledger: the source of truth for billing. A row is written once per metered event
(its idempotency key makes a retry a no-op); reporting to Stripe happens later, from here."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from core.db import upsert_insert
from core.ids import new_id
from core.models import UsageRecord

INFERENCE_TOKENS = "inference_tokens"
TRAINING_TOKENS = "training_tokens"


async def record_usage(
    session: AsyncSession, *, tenant_id: str, meter: str, quantity: int, idempotency_key: str
) -> None:
    """Add a ledger row to the session's transaction (the caller commits); a repeat is ignored."""
    await session.execute(
        upsert_insert(session)(UsageRecord)
        .values(
            id=new_id("use"),
            tenant_id=tenant_id,
            meter=meter,
            quantity=quantity,
            idempotency_key=idempotency_key,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
    )
