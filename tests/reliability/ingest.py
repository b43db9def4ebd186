"""A feedback load generator for the crash tests: concurrent clients, each posting single items
and small batches, and a ledger of what was acknowledged, to be checked against the database.

Items with an ``idempotency_key`` are retried until acknowledged (that is what the key is for).
Items without one are sent once: a client that did not get an answer cannot tell whether they
were stored, so they must be stored at most once, and exactly once when acknowledged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db import create_sessionmaker
from core.models import Feedback

RETRYABLE = (httpx.TransportError,)


@dataclass
class Ledger:
    acked_keys: set[str] = field(default_factory=set)
    acked_ids: dict[str, str] = field(default_factory=dict)  # marker -> feedback id
    unacked_batches: list[list[str]] = field(default_factory=list)  # markers, sent once
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    cut_in_flight: int = 0
    """Requests whose connection died after they were sent (not refused before)."""
    replayed_after_retry: int = 0
    error_bodies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return len(self.acked_ids)


def _item(marker: str, keyed: bool) -> dict[str, Any]:
    item: dict[str, Any] = {
        "prompt": f"question {marker}",
        "completion": "an answer",
        "rating": "up" if hash(marker) % 2 else "down",
        "comment": marker,
    }
    if keyed:
        item["idempotency_key"] = f"key-{marker}"
    return item


def items_sent(requests: int) -> int:
    """Items in ``requests`` requests of one client (every third one a batch of 4)."""
    return sum(1 if n % 3 else 4 for n in range(requests))


async def client_loop(
    http: httpx.AsyncClient,
    auth: dict[str, str],
    ledger: Ledger,
    *,
    requests: int,
    keyed: bool,
    deadline: float,
    on_ack: Callable[[], None] = lambda: None,
) -> None:
    for n in range(requests):
        size = 1 if n % 3 else 4  # every third request is a batch (see items_sent)
        markers = [secrets.token_hex(8) for _ in range(size)]
        items = [_item(m, keyed) for m in markers]
        body: dict[str, Any] = items[0] if size == 1 else {"items": items}
        attempt = 0
        while True:
            attempt += 1
            try:
                r = await http.post("/v1/feedback", json=body, headers=auth)
            except RETRYABLE as exc:
                ledger.transport_errors += 1
                if not isinstance(exc, httpx.ConnectError):
                    ledger.cut_in_flight += 1
                assert time.monotonic() < deadline, "the API did not come back"
                await asyncio.sleep(0.2)
                if not keyed:  # no key: the client cannot safely send it again
                    ledger.unacked_batches.append(markers)
                    break
                continue
            ledger.statuses[r.status_code] += 1
            if r.status_code == 503 and keyed:
                ledger.error_bodies.append(
                    {**r.json(), "retry_after": r.headers.get("retry-after")}
                )
                await asyncio.sleep(float(r.headers.get("retry-after", "1")) / 4)
                assert time.monotonic() < deadline, "the database did not come back"
                continue
            assert r.status_code in (200, 201), (r.status_code, r.text)
            data = r.json()
            rows = data["data"] if size > 1 else [data]
            if attempt > 1 and r.status_code == 200:
                ledger.replayed_after_retry += 1  # stored before the failure, acked now
            for marker, row in zip(markers, rows, strict=True):
                ledger.acked_ids[marker] = row["id"]
                if keyed:
                    ledger.acked_keys.add(f"key-{marker}")
            on_ack()
            break


async def check_ledger(engine: AsyncEngine, tenant_id: str, ledger: Ledger) -> dict[str, int]:
    """Every acknowledged item is stored exactly once; unacknowledged ones at most once, and a
    batch whole or not at all. Returns counts for the report."""
    async with create_sessionmaker(engine)() as s:
        rows = (
            await s.execute(
                select(Feedback.id, Feedback.comment, Feedback.idempotency_key).where(
                    Feedback.tenant_id == tenant_id
                )
            )
        ).all()
        total = await s.scalar(
            select(func.count()).select_from(Feedback).where(Feedback.tenant_id == tenant_id)
        )
    by_marker = Counter(comment for _, comment, _ in rows)
    ids = {comment: fid for fid, comment, _ in rows}
    duplicated = [m for m, n in by_marker.items() if n > 1]
    assert not duplicated, f"stored more than once: {duplicated[:5]}"
    missing = [m for m in ledger.acked_ids if by_marker[m] != 1]
    assert not missing, f"acknowledged but not stored: {missing[:5]}"
    wrong_id = [m for m, fid in ledger.acked_ids.items() if ids[m] != fid]
    assert not wrong_id, f"stored under another id than acknowledged: {wrong_id[:5]}"
    keys = Counter(k for _, _, k in rows if k is not None)
    assert set(keys) == ledger.acked_keys and all(n == 1 for n in keys.values())
    stored_unacked = 0
    for batch in ledger.unacked_batches:
        stored = sum(by_marker[m] for m in batch)
        assert stored in (0, len(batch)), f"a batch stored in part: {stored}/{len(batch)}"
        stored_unacked += stored
    assert total == ledger.acked + stored_unacked
    return {"rows": int(total or 0), "acked": ledger.acked, "stored_unacked": stored_unacked}
