from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep
from core.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the database cannot be reached"}})
async def readyz(session: SessionDep) -> dict[str, str]:
    """Readiness: the database answers a query."""
    try:
        await session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure here means "not ready", and says why
        raise Unavailable(f"database not ready: {type(exc).__name__}") from exc
    return {"status": "ready"}
