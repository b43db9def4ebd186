"""Feedback ingestion (durable before acknowledged, idempotent) and the admin's read side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Select, case, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import InvalidInput
from core.ids import new_id
from core.models import Feedback, Interaction


@dataclass(frozen=True)
class NewFeedback:
    """One validated feedback item: it names an interaction or carries the conversation."""

    rating: int
    interaction_id: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    score: float | None = None
    comment: str | None = None
    correction: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = field(default=None)


@dataclass(frozen=True)
class StoredFeedback:
    """A committed feedback row; ``created`` is False when an idempotent retry found it."""

    row: dict[str, Any]
    created: bool


_COLUMNS = (
    "id",
    "tenant_id",
    "interaction_id",
    "messages",
    "prompt",
    "completion",
    "rating",
    "score",
    "comment",
    "correction",
    "user_id",
    "idempotency_key",
    "meta",
    "created_at",
)


def _as_dict(fb: Feedback) -> dict[str, Any]:
    return {c: getattr(fb, c) for c in _COLUMNS}


def _insert_ignoring_replays(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (tenant_id, idempotency_key) DO NOTHING for this backend.

    A Core insert on the table, not the ORM class: the ORM's bulk path costs more per request
    than the database round trip on the ingest hot path.
    """
    table = Feedback.__table__
    if dialect not in ("postgresql", "sqlite"):
        return insert(table)
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing(
        index_elements=["tenant_id", "idempotency_key"]
    )


async def ingest_feedback(
    session: AsyncSession, *, tenant_id: str, items: Sequence[NewFeedback]
) -> list[StoredFeedback]:
    """Store every item or none, commit, and return them in input order.

    An item whose ``idempotency_key`` the tenant already used is not stored again; the original
    row is returned with ``created=False``.
    """
    if not items:
        raise InvalidInput("no feedback items given")
    _check_keys_unique(items)
    await _check_interactions(session, tenant_id=tenant_id, items=items)

    now = datetime.now(UTC)
    rows = []
    for item in items:
        values = asdict(item)
        rows.append({"id": new_id("fb"), "tenant_id": tenant_id, "created_at": now, **values})

    dialect = session.get_bind().dialect.name
    stmt = _insert_ignoring_replays(dialect).returning(Feedback.__table__.c.id)
    inserted = set((await session.execute(stmt, rows)).scalars())
    replayed_keys = [r["idempotency_key"] for r in rows if r["id"] not in inserted]
    originals: dict[str, dict[str, Any]] = {}
    if replayed_keys:
        found = await session.scalars(
            select(Feedback).where(
                Feedback.tenant_id == tenant_id, Feedback.idempotency_key.in_(replayed_keys)
            )
        )
        originals = {fb.idempotency_key: _as_dict(fb) for fb in found if fb.idempotency_key}
    await session.commit()

    out = []
    for r in rows:
        if r["id"] in inserted:
            out.append(StoredFeedback(row=r, created=True))
        else:
            out.append(StoredFeedback(row=originals[r["idempotency_key"]], created=False))
    return out


def _check_keys_unique(items: Sequence[NewFeedback]) -> None:
    seen: dict[str, int] = {}
    errors = []
    for index, item in enumerate(items):
        key = item.idempotency_key
        if key is None:
            continue
        if key in seen:
            errors.append(
                {
                    "index": index,
                    "field": "idempotency_key",
                    "message": f"idempotency_key {key!r} is also used by item {seen[key]}",
                }
            )
        else:
            seen[key] = index
    if errors:
        raise InvalidInput("an idempotency_key appears twice in one batch", details=errors)


async def _check_interactions(
    session: AsyncSession, *, tenant_id: str, items: Sequence[NewFeedback]
) -> None:
    wanted = {i.interaction_id for i in items if i.interaction_id is not None}
    if not wanted:
        return
    # Another tenant's interaction is as unknown as one that never existed.
    known = set(
        await session.scalars(
            select(Interaction.id).where(
                Interaction.tenant_id == tenant_id, Interaction.id.in_(wanted)
            )
        )
    )
    errors = [
        {
            "index": index,
            "field": "interaction_id",
            "message": f"unknown interaction_id {item.interaction_id!r}",
        }
        for index, item in enumerate(items)
        if item.interaction_id is not None and item.interaction_id not in known
    ]
    if errors:
        raise InvalidInput(
            "feedback names interactions this tenant does not have; nothing was stored",
            details=errors,
            code="unknown_interaction",
        )


async def list_feedback(
    session: AsyncSession,
    *,
    tenant_id: str,
    limit: int,
    cursor: str | None = None,
    rating: int | None = None,
    user_id: str | None = None,
) -> tuple[list[Feedback], str | None]:
    """Newest first. Returns a page and the cursor of the next page (None at the end)."""
    query: Select[Feedback] = (
        select(Feedback).where(Feedback.tenant_id == tenant_id).order_by(Feedback.id.desc())
    )
    if cursor is not None:
        query = query.where(Feedback.id < cursor)
    if rating is not None:
        query = query.where(Feedback.rating == rating)
    if user_id is not None:
        query = query.where(Feedback.user_id == user_id)
    page = list(await session.scalars(query.limit(limit + 1)))
    if len(page) > limit:
        return page[:limit], page[limit - 1].id
    return page, None


@dataclass(frozen=True)
class DayStats:
    day: date
    total: int
    up: int

    @property
    def down(self) -> int:
        return self.total - self.up

    @property
    def up_rate(self) -> float | None:
        return self.up / self.total if self.total else None


async def feedback_stats(
    session: AsyncSession, *, tenant_id: str, days: int
) -> tuple[DayStats, list[DayStats]]:
    """Totals over all time and per UTC day over the last ``days`` days (oldest first)."""
    up = func.sum(case((Feedback.rating > 0, 1), else_=0))
    total_row = (
        await session.execute(
            select(func.count(), func.coalesce(up, 0)).where(Feedback.tenant_id == tenant_id)
        )
    ).one()
    today = datetime.now(UTC).date()
    since = datetime.combine(today - timedelta(days=days - 1), datetime.min.time(), tzinfo=UTC)
    day = func.date(Feedback.created_at)
    per_day = await session.execute(
        select(day, func.count(), func.coalesce(up, 0))
        .where(Feedback.tenant_id == tenant_id, Feedback.created_at >= since)
        .group_by(day)
    )
    # SQLite returns 'YYYY-MM-DD' strings, Postgres date objects.
    counts = {date.fromisoformat(str(d)): (int(n), int(u)) for d, n, u in per_day}
    series = [
        DayStats(day=d, total=counts.get(d, (0, 0))[0], up=counts.get(d, (0, 0))[1])
        for d in (since.date() + timedelta(days=i) for i in range(days))
    ]
    return DayStats(day=today, total=int(total_row[0]), up=int(total_row[1])), series
