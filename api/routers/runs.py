"""Personalization runs (start, follow, cancel, approve or reject) and the training policy, for
tenant admins."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.deps import AdminKeyDep, AdminTenantDep, SessionDep, orchestrator
from api.orchestration import MAX_DECISION_REASON, save_policy, waiting_for
from api.schemas import ListOf, RequestModel
from core.keys import key_label
from core.models import RunEvent, Tenant, TrainingRun
from core.policy import TrainingPolicy, policy_of
from core.runs import ACTIVE, find_run

router = APIRouter(prefix="/v1", tags=["runs"])


class RunCreate(RequestModel):
    method: Literal["auto", "dpo", "kto", "grpo"] | None = Field(
        default=None, description="override the policy's method for this run"
    )


class RunOut(BaseModel):
    object: Literal["training_run"] = "training_run"
    id: str
    status: str
    method: str
    trigger: str
    reason: str | None
    progress: dict[str, Any]
    waiting_for: str | None = Field(
        default=None,
        description="`approval`: the run's candidate (`adapter_version_id`) passed the gate and "
        "waits for an admin: POST /v1/runs/{id}/approve or /v1/runs/{id}/reject; `canary`: it "
        "answers a share of end users beside the live version until their thumbs decide "
        "(GET /v1/deployment)",
    )
    waiting_until: datetime | None = Field(
        default=None,
        description="when an unanswered approval, or an undecided canary, ends the run not "
        "promoted",
    )
    dataset_id: str | None
    adapter_version_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, r: TrainingRun) -> RunOut:
        progress = r.progress or {}
        waiting = waiting_for(r)
        return cls(
            id=r.id,
            status=r.status.value,
            method=r.method,
            trigger=r.trigger,
            reason=r.reason,
            progress=progress,
            waiting_for=waiting,
            waiting_until=progress.get("waiting_until") if waiting else None,
            dataset_id=r.dataset_id,
            adapter_version_id=r.adapter_version_id,
            created_at=r.created_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
        )


class RunRejection(RequestModel):
    reason: str | None = Field(
        default=None,
        max_length=MAX_DECISION_REASON,
        description="why the candidate is turned down; kept with the rejected version",
    )


class EventOut(BaseModel):
    object: Literal["training_run.event"] = "training_run.event"
    id: int
    created_at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


@router.post(
    "/runs",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"description": "a run is already in flight: that run is returned"},
        402: {
            "description": "billing_suspended (the subscription is unpaid) or budget_exceeded "
            "(the run's estimated cost would pass the monthly budget; details has the numbers)"
        },
    },
)
async def start_run(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant_id: AdminTenantDep,
    body: RunCreate | None = None,
) -> RunOut:
    """Start a personalization run (202). One run per tenant at a time: while one is in flight,
    its resource is returned instead (200)."""
    run, started = await orchestrator(request).start_run(
        session, tenant_id=tenant_id, trigger="manual", method=body.method if body else None
    )
    if not started:
        response.status_code = status.HTTP_200_OK
    return RunOut.of(run)


@router.get("/runs")
async def list_runs(
    session: SessionDep,
    tenant_id: AdminTenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> ListOf[RunOut]:
    query = select(TrainingRun).where(TrainingRun.tenant_id == tenant_id)
    if cursor:
        query = query.where(TrainingRun.id < cursor)
    rows = list(await session.scalars(query.order_by(TrainingRun.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    page = rows[:limit]
    return ListOf[RunOut](
        data=[RunOut.of(r) for r in page], has_more=more, next_cursor=page[-1].id if more else None
    )


@router.get("/runs/{run_id}")
async def get_run(run_id: str, session: SessionDep, tenant_id: AdminTenantDep) -> RunOut:
    return RunOut.of(await find_run(session, tenant_id=tenant_id, run_id=run_id))


@router.get("/runs/{run_id}/events")
async def run_events(
    run_id: str,
    session: SessionDep,
    tenant_id: AdminTenantDep,
    # Bounded to the column's range: a larger integer cannot even be bound as a query parameter.
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="the last event id you have")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ListOf[EventOut]:
    """Oldest first, like OpenAI's fine-tuning job events; poll with ``after``."""
    await find_run(session, tenant_id=tenant_id, run_id=run_id)
    rows = list(
        await session.scalars(
            select(RunEvent)
            .where(RunEvent.tenant_id == tenant_id, RunEvent.run_id == run_id, RunEvent.id > after)
            .order_by(RunEvent.id)
            .limit(limit + 1)
        )
    )
    page = rows[:limit]
    return ListOf[EventOut](
        data=[
            EventOut(
                id=e.id,
                created_at=e.created_at,
                level=e.level,
                type=e.type,
                message=e.message,
                data=e.data,
            )
            for e in page
        ],
        has_more=len(rows) > limit,
        next_cursor=str(page[-1].id) if len(rows) > limit else None,
    )


@router.post("/runs/{run_id}/cancel", status_code=status.HTTP_202_ACCEPTED)
async def cancel_run(
    run_id: str, request: Request, session: SessionDep, tenant_id: AdminTenantDep
) -> RunOut:
    """Ask a run to stop; training checkpoints and the run ends ``cancelled``."""
    run = await find_run(session, tenant_id=tenant_id, run_id=run_id)
    if run.status in ACTIVE:
        await orchestrator(request).cancel(run)
    return RunOut.of(run)


_NOT_WAITING: dict[int | str, dict[str, Any]] = {
    409: {
        "description": "not_awaiting_approval: the run is not waiting for approval (it never "
        "did, it has ended, or an admin already answered)"
    }
}


@router.post("/runs/{run_id}/approve", status_code=status.HTTP_202_ACCEPTED, responses=_NOT_WAITING)
async def approve_run(
    run_id: str,
    request: Request,
    session: SessionDep,
    tenant_id: AdminTenantDep,
    admin: AdminKeyDep,
) -> RunOut:
    """Let a run waiting for approval promote its candidate; the run then ends ``succeeded``
    with the candidate serving ``default``. Your key's name is recorded as the approver."""
    run = await find_run(session, tenant_id=tenant_id, run_id=run_id)
    by = await key_label(session, key_id=admin.key_id)
    await orchestrator(request).decide(session, run=run, approve=True, by=by)
    return RunOut.of(run)


@router.post("/runs/{run_id}/reject", status_code=status.HTTP_202_ACCEPTED, responses=_NOT_WAITING)
async def reject_run(
    run_id: str,
    request: Request,
    session: SessionDep,
    tenant_id: AdminTenantDep,
    admin: AdminKeyDep,
    body: RunRejection | None = None,
) -> RunOut:
    """Turn down the candidate of a run waiting for approval: the run ends ``succeeded``, not
    promoted, and the version is kept ``rejected`` with who rejected it and ``reason``."""
    run = await find_run(session, tenant_id=tenant_id, run_id=run_id)
    by = await key_label(session, key_id=admin.key_id)
    await orchestrator(request).decide(
        session, run=run, approve=False, by=by, reason=body.reason if body else None
    )
    return RunOut.of(run)


@router.get("/policy")
async def get_policy(session: SessionDep, tenant_id: AdminTenantDep) -> TrainingPolicy:
    tenant = await session.get(Tenant, tenant_id)
    assert tenant is not None
    return policy_of(tenant.policy)


@router.put("/policy")
async def put_policy(
    body: TrainingPolicy, request: Request, session: SessionDep, tenant_id: AdminTenantDep
) -> TrainingPolicy:
    """Replace the training policy (fields left out take their defaults). A ``schedule`` is
    kept in step as a Temporal Schedule; setting one needs orchestration to be configured."""
    await save_policy(request, session, tenant_id=tenant_id, policy=body)
    return body
