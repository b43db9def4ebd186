"""A tenant's data, out (GDPR Article 20): its feedback, the answers it served and its adapter
versions' metadata, as plain JSON objects, read in keyset-paged batches so a tenant of any size
streams in bounded memory and no connection is held between batches."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.models import AdapterVersion, Feedback, Interaction

BATCH = 500

_FIELDS: dict[Any, tuple[str, tuple[str, ...]]] = {
    # model: (object name, the columns a tenant gets back)
    Feedback: (
        "feedback",
        ("id", "interaction_id", "messages", "prompt", "completion", "rating", "score",
         "comment", "correction", "user_id", "idempotency_key", "meta", "created_at"),
    ),
    Interaction: (
        "interaction",
        ("id", "adapter_version_id", "model", "messages", "completion", "prompt_tokens",
         "completion_tokens", "sampling", "latency_ms", "created_at"),
    ),
    AdapterVersion: (
        "adapter_version",
        ("id", "run_id", "sha256", "serving_name", "base_model", "rank", "status",
         "eval_report", "reason", "created_at", "promoted_at", "erased_data_at"),
    ),
}  # fmt: skip


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


async def export_tenant(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str
) -> AsyncIterator[dict[str, Any]]:
    """Every feedback item, interaction and adapter version of ``tenant_id``, oldest first, each
    as ``{"object": kind, ...columns}``."""
    for model, (kind, columns) in _FIELDS.items():
        after = ""
        while True:
            async with sessionmaker() as session:
                rows = list(
                    await session.scalars(
                        select(model)
                        .where(model.tenant_id == tenant_id, model.id > after)
                        .order_by(model.id)
                        .limit(BATCH)
                    )
                )
            for row in rows:
                yield {"object": kind} | {c: _plain(getattr(row, c)) for c in columns}
            if len(rows) < BATCH:
                break
            after = str(rows[-1].id)
