"""Erasing one end user's data (GDPR Article 17).

What tuneloop keeps of an end user, found by the ``user_id`` their feedback carries:

- their feedback items, and the served answers (interactions) those items rate;
- compiled datasets on the volume, which hold the text of every feedback item compiled since;
- the sample answers in an adapter version's eval report, drawn from those datasets.

Erasure deletes the first, deletes the dataset files compiled since the user's first feedback
(their rows stay, marked, with aggregate counts only), strips the samples from the eval reports
of the versions trained on them and flags those versions (``erased_data_at``): the adapter's
weights were fitted on the erased data, and the tenant decides whether to retrain. The next run
compiles without it.

An answer nobody rated carries no ``user_id``: it cannot be attributed to a user, and so is not
found here (a retention period covers it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import NotFound, Unavailable
from core.models import AdapterVersion, Dataset, Feedback, Interaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Erasure:
    user_id: str
    feedback_deleted: int
    interactions_deleted: int
    datasets_deleted: int
    adapter_versions_flagged: int


async def erase_user(session: AsyncSession, *, tenant_id: str, user_id: str) -> Erasure:
    """Erase ``user_id``'s data in ``tenant_id`` (and only there). ``NotFound`` when the tenant
    holds no feedback from that user (never, or no longer: erasing twice says so)."""
    mine = (Feedback.tenant_id == tenant_id, Feedback.user_id == user_id)
    first = await session.scalar(select(func.min(Feedback.created_at)).where(*mine))
    if first is None:
        # Another tenant's user of the same id looks exactly like one that never existed.
        raise NotFound(f"no feedback from user {user_id!r} in this tenant (nothing to erase)")
    # As subqueries: one user id ("anonymous") may carry more feedback than a query may bind.
    rated = select(Feedback.interaction_id).where(*mine, Feedback.interaction_id.is_not(None))
    # Other users' votes on the same answers lose their text with them.
    await session.execute(
        update(Feedback)
        .where(
            Feedback.tenant_id == tenant_id,
            Feedback.interaction_id.in_(rated),
            or_(Feedback.user_id.is_(None), Feedback.user_id != user_id),
        )
        .values(interaction_id=None)
    )
    interactions = _count(
        await session.execute(
            delete(Interaction).where(Interaction.tenant_id == tenant_id, Interaction.id.in_(rated))
        )
    )
    feedback = _count(await session.execute(delete(Feedback).where(*mine)))

    datasets = list(
        await session.scalars(
            select(Dataset).where(
                Dataset.tenant_id == tenant_id, Dataset.created_at >= first, Dataset.uri != ""
            )
        )
    )
    now = datetime.now(UTC)
    left = await asyncio.to_thread(_remove, [Path(d.uri) for d in datasets])
    if left:
        await session.rollback()
        log.error("erasure of a user of tenant %s: cannot delete %s", tenant_id, left)
        raise Unavailable(
            "this API process cannot delete the compiled datasets that hold the user's feedback "
            "(is the data volume mounted read-only here?); nothing was erased, the operator's "
            "log says where"
        )
    for dataset in datasets:
        dataset.uri = ""
        dataset.data_card = {**(dataset.data_card or {}), "erased_at": now.isoformat()}
    runs = {d.run_id for d in datasets if d.run_id is not None}
    versions = (
        list(
            await session.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.tenant_id == tenant_id, AdapterVersion.run_id.in_(runs)
                )
            )
        )
        if runs
        else []
    )
    for version in versions:
        version.erased_data_at = now
        if version.eval_report and version.eval_report.get("samples"):
            version.eval_report = {**version.eval_report, "samples": []}
    await session.commit()
    return Erasure(user_id, feedback, interactions, len(datasets), len(versions))


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _remove(paths: list[Path]) -> list[str]:
    """Delete each directory; returns those still there."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return [str(p) for p in paths if p.exists()]
