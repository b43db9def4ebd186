"""A tenant's personalization runs: which one is in flight, whether the tenant may train now,
and a run's life in the database (it begins, moves, logs its events, finishes).

Written once for every place a run is touched: the API (a person, or auto-start, asks for one)
and the workflow's activities (every run, scheduled ones included, which reach no API check).
The tenant's training policy, which says how its runs go and when they start, is saved here too."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.billing import BillingConfig, check_training_allowed
from core.errors import (
    BillingSuspended,
    BudgetExceeded,
    Conflict,
    NotFound,
    TenantSuspended,
)
from core.models import RunEvent, RunStatus, Tenant, TenantStatus, TrainingRun, utcnow
from core.policy import TrainingPolicy, policy_of

ACTIVE = (RunStatus.queued, RunStatus.running)
"""A run in one of these holds the tenant's one slot: no other run starts beside it."""
FINISHED = (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.skipped)


class AnotherRunActive(Conflict):
    code = "run_in_progress"


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


async def begin(
    session: AsyncSession, run: TrainingRun, *, trigger: str, billing: BillingConfig
) -> None:
    """A queued run starts running, unless another run holds the tenant's slot
    (``AnotherRunActive``) or the tenant may not train now (``check_may_train``'s refusals):
    then the run ends ``skipped`` with the reason (committed) and the refusal is raised."""
    try:
        other = await active_run(session, tenant_id=run.tenant_id, other_than=run.id)
        if other is not None:
            raise AnotherRunActive(f"run {other.id} is in progress for this tenant")
        await check_may_train(session, tenant_id=run.tenant_id, billing=billing)
    except (AnotherRunActive, TenantSuspended, BillingSuspended, BudgetExceeded) as exc:
        finish(run, RunStatus.skipped, exc.message)
        level = "info" if isinstance(exc, AnotherRunActive) else "warn"
        log_event(session, run, f"run skipped: {exc.message}", level=level)
        await session.commit()
        raise
    run.status = RunStatus.running
    run.started_at = utcnow()
    log_event(session, run, "run started", data={"trigger": trigger})


def finish(run: TrainingRun, status: RunStatus, reason: str | None = None) -> None:
    """The run's status; a final one stamps ``finished_at``. ``reason`` None keeps the old."""
    run.status = status
    if status in FINISHED:
        run.finished_at = utcnow()
    if reason is not None:
        run.reason = reason


async def update(
    session: AsyncSession,
    *,
    tenant_id: str,
    run_id: str,
    status: str | None = None,
    message: str = "",
    level: str = "info",
    reason: str | None = None,
    dataset_id: str | None = None,
    version_id: str | None = None,
    method: str | None = None,
    data: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> None:
    """One change to the tenant's run (uncommitted): what is given is set, ``progress`` keys are
    merged in (a None value removes its key), and ``message`` is logged as an event with
    ``data``. ``NotFound`` when the run is not the tenant's."""
    run = await session.get(TrainingRun, run_id)
    if run is None or run.tenant_id != tenant_id:
        raise NotFound(f"no run {run_id!r}")
    if status is not None:
        finish(run, RunStatus(status), reason)
    elif reason is not None:
        run.reason = reason
    if dataset_id is not None:
        run.dataset_id = dataset_id
    if version_id is not None:
        run.adapter_version_id = version_id
    if method is not None:
        run.method = method
    if progress is not None:
        merged = {**(run.progress or {}), **progress}
        run.progress = {k: v for k, v in merged.items() if v is not None}
    if message:
        log_event(session, run, message, level=level, data=data)


async def record_progress(
    session: AsyncSession, *, run_id: str, progress: dict[str, Any], message: str
) -> None:
    """A training step's numbers as the run's ``progress`` (replacing the last step's) and a
    ``metrics`` event (uncommitted). NaN and infinities are left out: JSON has no word for them."""
    run = await session.get(TrainingRun, run_id)
    if run is None:
        return
    run.progress = {
        k: v for k, v in progress.items() if not isinstance(v, float) or math.isfinite(v)
    }
    log_event(session, run, message, type_="metrics", data=run.progress)


def log_event(
    session: AsyncSession,
    run: TrainingRun,
    message: str,
    *,
    level: str = "info",
    type_: str = "message",
    data: Any = None,
) -> None:
    """An entry in the run's event log (``GET /v1/runs/{id}/events``), added to ``session``."""
    session.add(
        RunEvent(
            tenant_id=run.tenant_id,
            run_id=run.id,
            level=level,
            type=type_,
            message=message,
            data=data,
        )
    )


async def save_policy(
    session: AsyncSession,
    *,
    tenant_id: str,
    policy: TrainingPolicy,
    sync_schedule: Callable[[str, TrainingPolicy], Awaitable[None]],
) -> None:
    """Store a tenant's training policy. ``sync_schedule`` (the orchestrator's: it creates,
    updates or deletes the tenant's Temporal Schedule) runs first, and only when the old or the
    new policy has a schedule: should Temporal refuse, the stored policy stays as it was, never
    naming a schedule that does not exist."""
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    if policy.schedule is not None or policy_of(tenant.policy).schedule is not None:
        await sync_schedule(tenant_id, policy)
    tenant.policy = policy.model_dump()
    await session.commit()
