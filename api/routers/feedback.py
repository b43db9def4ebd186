"""Thumbs from product code (write) and the admin's view of them (read)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Query, Request, Response, status

from api.deps import AdminTenantDep, FeedbackWriterDep, ProductTenantDep, SessionDep
from api.schemas import (
    MAX_BATCH,
    DayStatsOut,
    FeedbackAck,
    FeedbackBatch,
    FeedbackBatchOut,
    FeedbackBody,
    FeedbackOut,
    FeedbackStatsOut,
    ListOf,
)
from core import feedback

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"description": "every item was a retry of an already stored idempotency_key"},
        422: {"description": "invalid item(s); `details[].index` says which; nothing stored"},
    },
)
async def post_feedback(
    body: Annotated[
        FeedbackBody, Body(description=f"one item, or {{items: [...]}} (1-{MAX_BATCH})")
    ],
    request: Request,
    response: Response,
    writer: FeedbackWriterDep,
    tenant_id: ProductTenantDep,
) -> FeedbackOut | FeedbackBatchOut:
    """Store feedback. The response comes only after the rows are committed. A batch is stored
    whole or not at all. A repeated ``idempotency_key`` returns the original record."""
    items = body.items if isinstance(body, FeedbackBatch) else [body]
    stored = await writer.write(tenant_id=tenant_id, items=[i.to_core() for i in items])
    _after_feedback(request, tenant_id)
    created = sum(s.created for s in stored)
    if created == 0:
        response.status_code = status.HTTP_200_OK
    if isinstance(body, FeedbackBatch):
        return FeedbackBatchOut(
            data=[
                FeedbackAck(
                    id=s.row["id"],
                    idempotency_key=s.row["idempotency_key"],
                    status="created" if s.created else "replayed",
                )
                for s in stored
            ],
            created=created,
            replayed=len(stored) - created,
        )
    return FeedbackOut.of_row(stored[0].row)


_background: set[asyncio.Task[None]] = set()


def _after_feedback(request: Request, tenant_id: str) -> None:
    """Maybe start a run (policy ``auto_train_after``), without delaying the answer."""
    if request.app.state.orchestrator.address is None:
        return
    task = asyncio.create_task(
        request.app.state.orchestrator.maybe_auto_start(request.app.state.sessionmaker, tenant_id)
    )
    _background.add(task)  # keep a reference until it is done
    task.add_done_callback(_finished)


def _finished(task: asyncio.Task[None]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("auto-start check failed", exc_info=task.exception())


@router.get("")
async def list_feedback(
    session: SessionDep,
    tenant_id: AdminTenantDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=40, description="next_cursor of the last page")
    ] = None,
    rating: Literal["up", "down"] | None = None,
    user_id: Annotated[str | None, Query(max_length=256)] = None,
) -> ListOf[FeedbackOut]:
    """Newest first, cursor-paged."""
    page, next_cursor = await feedback.list_feedback(
        session,
        tenant_id=tenant_id,
        limit=limit,
        cursor=cursor,
        rating=None if rating is None else (1 if rating == "up" else -1),
        user_id=user_id,
    )
    return ListOf[FeedbackOut](
        data=[FeedbackOut.of(f) for f in page],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )


@router.get("/stats")
async def feedback_stats(
    session: SessionDep,
    tenant_id: AdminTenantDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> FeedbackStatsOut:
    """Counts and up-rate overall and per UTC day (oldest first)."""
    total, series = await feedback.feedback_stats(session, tenant_id=tenant_id, days=days)
    return FeedbackStatsOut(
        total=total.total,
        up=total.up,
        down=total.down,
        up_rate=total.up_rate,
        days=[DayStatsOut.of(d) for d in series],
    )
