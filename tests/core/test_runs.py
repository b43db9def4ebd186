"""A run's life in the database (``core.runs``), on both databases: the API and the workflow's
activities both write runs through these."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core import runs
from core.billing import BillingConfig
from core.db import create_sessionmaker
from core.errors import NotFound, TenantSuspended
from core.models import RunEvent, RunStatus, Tenant, TenantStatus, TrainingRun
from core.policy import TrainingPolicy, policy_of
from tests.conftest import Backend, TenantKeys


async def _events(session: AsyncSession, run_id: str) -> list[tuple[str, str, str]]:
    rows = await session.scalars(
        select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
    )
    return [(e.level, e.type, e.message) for e in rows]


async def test_a_run_begins_or_is_skipped_saying_why(backend: Backend, tenant: TenantKeys) -> None:
    async with create_sessionmaker(backend.engine)() as s:
        first = TrainingRun(tenant_id=tenant.id, trigger="manual", method="auto")
        s.add(first)
        await s.commit()
        await runs.begin(s, first, trigger="manual", billing=BillingConfig())
        await s.commit()
        assert first.status is RunStatus.running and first.started_at is not None
        assert await _events(s, first.id) == [("info", "message", "run started")]

        second = TrainingRun(tenant_id=tenant.id, trigger="schedule", method="auto")
        s.add(second)
        await s.commit()

        with pytest.raises(runs.AnotherRunActive, match=f"run {first.id} is in progress"):
            await runs.begin(s, second, trigger="schedule", billing=BillingConfig())
        await s.refresh(second)
        assert second.status is RunStatus.skipped and second.finished_at is not None
        assert await _events(s, second.id) == [
            ("info", "message", f"run skipped: run {first.id} is in progress for this tenant")
        ]

        # The slot free again, but the tenant suspended: skipped too, as a warning.
        runs.finish(first, RunStatus.succeeded, "promoted")
        third = TrainingRun(tenant_id=tenant.id, trigger="schedule", method="auto")
        s.add(third)
        (await s.get(Tenant, tenant.id)).status = TenantStatus.suspended  # type: ignore[union-attr]
        await s.commit()
        with pytest.raises(TenantSuspended):
            await runs.begin(s, third, trigger="schedule", billing=BillingConfig())
        await s.refresh(third)
        assert third.status is RunStatus.skipped and "suspended" in (third.reason or "")
        assert [level for level, _, _ in await _events(s, third.id)] == ["warn"]
        (await s.get(Tenant, tenant.id)).status = TenantStatus.active  # type: ignore[union-attr]
        await s.commit()


async def test_updates_merge_progress_and_finish_once(
    backend: Backend,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with create_sessionmaker(backend.engine)() as s:
        run = TrainingRun(tenant_id=a.id, trigger="manual", method="auto")
        s.add(run)
        await s.commit()
        await runs.update(s, tenant_id=a.id, run_id=run.id, progress={"step": 1, "eta_s": 9.0})
        await runs.update(
            s,
            tenant_id=a.id,
            run_id=run.id,
            progress={"eta_s": None, "waiting_for": "canary"},
            message="canary started",
            data={"version_id": "v1"},
        )
        await s.commit()
        assert run.progress == {"step": 1, "waiting_for": "canary"}  # None removes its key
        assert run.finished_at is None
        await runs.update(
            s, tenant_id=a.id, run_id=run.id, status="succeeded", reason="promoted", method="kto"
        )
        await s.commit()
        assert (run.status, run.reason, run.method) == (RunStatus.succeeded, "promoted", "kto")
        assert run.finished_at is not None
        assert await _events(s, run.id) == [("info", "message", "canary started")]

        # Another tenant's run is no run at all.
        with pytest.raises(NotFound):
            await runs.update(s, tenant_id=b.id, run_id=run.id, reason="hijacked")
        await runs.record_progress(
            s, run_id=run.id, progress={"loss": float("nan"), "step": 2}, message="step 2/4"
        )
        await s.commit()
        assert run.progress == {"step": 2}  # JSON has no NaN
        assert (await _events(s, run.id))[-1] == ("info", "metrics", "step 2/4")


async def test_a_policy_is_saved_after_its_schedule_and_not_when_the_schedule_fails(
    backend: Backend, tenant: TenantKeys
) -> None:
    synced: list[tuple[str, str | None]] = []

    async def sync(tenant_id: str, policy: TrainingPolicy) -> None:
        synced.append((tenant_id, policy.schedule))

    async def refuse(tenant_id: str, policy: TrainingPolicy) -> None:
        raise RuntimeError("Temporal is down")

    async def stored(s: AsyncSession) -> TrainingPolicy:
        row = await s.get(Tenant, tenant.id)
        assert row is not None
        await s.refresh(row)
        return policy_of(row.policy)

    async with create_sessionmaker(backend.engine)() as s:
        # No schedule before or after: Temporal is not asked.
        await runs.save_policy(
            s, tenant_id=tenant.id, policy=TrainingPolicy(max_steps=7), sync_schedule=sync
        )
        assert synced == [] and (await stored(s)).max_steps == 7

        nightly = TrainingPolicy(schedule="0 3 * * *")
        await runs.save_policy(s, tenant_id=tenant.id, policy=nightly, sync_schedule=sync)
        assert synced == [(tenant.id, "0 3 * * *")]
        assert (await stored(s)).schedule == "0 3 * * *"

        # Temporal refuses the change: the stored policy still names the schedule it has.
        with pytest.raises(RuntimeError, match="Temporal is down"):
            await runs.save_policy(
                s, tenant_id=tenant.id, policy=TrainingPolicy(), sync_schedule=refuse
            )
        await s.rollback()
        assert (await stored(s)).schedule == "0 3 * * *"

        # Clearing the schedule is synced too (the Temporal Schedule is deleted).
        await runs.save_policy(s, tenant_id=tenant.id, policy=TrainingPolicy(), sync_schedule=sync)
        assert synced[-1] == (tenant.id, None) and (await stored(s)).schedule is None

        with pytest.raises(NotFound):
            await runs.save_policy(
                s, tenant_id="t-missing", policy=TrainingPolicy(), sync_schedule=sync
            )
