"""A tenant's personalization runs: which one is in flight, and whether the tenant may train now.

Written once for both places a run begins: the API (a person, or auto-start, asks for one) and
the workflow's first activity (every run, scheduled ones included, which reach no API check)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.billing import BillingConfig, check_training_allowed
from core.errors import NotFound, TenantSuspended
from core.models import RunStatus, Tenant, TenantStatus, TrainingRun

ACTIVE = (RunStatus.queued, RunStatus.running)
"""A run in one of these holds the tenant's one slot: no other run starts beside it."""


async def active_run(
    session: AsyncSession, *, tenant_id: str, other_than: str | None = None
) -> TrainingRun | None:
    """The tenant's run in flight (the newest, should there be two), or None. ``other_than``:
    a run asking whether another one holds the slot."""
    query = select(TrainingRun).where(
        TrainingRun.tenant_id == tenant_id, TrainingRun.status.in_(ACTIVE)
    )
    if other_than is not None:
        query = query.where(TrainingRun.id != other_than)
    run: TrainingRun | None = await session.scalar(query.order_by(TrainingRun.id.desc()).limit(1))
    return run


async def check_may_train(session: AsyncSession, *, tenant_id: str, billing: BillingConfig) -> None:
    """Raise why the tenant may not train now: ``NotFound``, ``TenantSuspended`` (the
    operator's doing), ``BillingSuspended`` (an unpaid subscription) or ``BudgetExceeded`` (a
    run's estimate would pass the monthly budget)."""
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    if tenant.status is TenantStatus.suspended:
        raise TenantSuspended(
            "the operator suspended this tenant: its runs are refused until it is reactivated"
        )
    await check_training_allowed(session, tenant_id=tenant_id, config=billing)


async def find_run(session: AsyncSession, *, tenant_id: str, run_id: str) -> TrainingRun:
    """The tenant's run, or ``NotFound`` (another tenant's run looks exactly like none)."""
    run = await session.scalar(
        select(TrainingRun).where(TrainingRun.tenant_id == tenant_id, TrainingRun.id == run_id)
    )
    if run is None:
        raise NotFound(f"no run {run_id!r}")
    return run
