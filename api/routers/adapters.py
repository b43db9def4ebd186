"""A tenant admin's adapter versions: eval reports, manual promotion, one-call rollback."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.deps import AdminTenantDep, SessionDep
from api.schemas import ListOf
from core import deployments
from core.models import AdapterVersion
from serving import registry
from serving.gateway import AdapterPlacement

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


class AdapterOut(BaseModel):
    object: Literal["adapter_version"] = "adapter_version"
    id: str
    serving_name: str
    status: str
    live: bool
    base_model: str
    rank: int
    sha256: str
    run_id: str | None
    eval_report: dict[str, Any] | None
    reason: str | None
    created_at: datetime
    promoted_at: datetime | None
    erased_data_at: datetime | None = None
    """Set when an end user's data this version was trained on was erased."""

    @classmethod
    def of(cls, v: AdapterVersion, live_id: str | None) -> AdapterOut:
        return cls(
            id=v.id,
            serving_name=v.serving_name,
            status=v.status.value,
            live=v.id == live_id,
            base_model=v.base_model,
            rank=v.rank,
            sha256=v.sha256,
            run_id=v.run_id,
            eval_report=v.eval_report,
            reason=v.reason,
            created_at=v.created_at,
            promoted_at=v.promoted_at,
            erased_data_at=v.erased_data_at,
        )


class RollbackOut(BaseModel):
    object: Literal["deployment"] = "deployment"
    live: str
    """The version now served as ``default``, or ``base``."""


@router.get("")
async def list_adapters(session: SessionDep, tenant_id: AdminTenantDep) -> ListOf[AdapterOut]:
    """Every version, newest first, with its eval report; ``live`` marks what ``default`` serves."""
    live = await deployments.live_version_id(session, tenant_id=tenant_id)
    versions = await deployments.list_versions(session, tenant_id=tenant_id)
    return ListOf[AdapterOut](data=[AdapterOut.of(v, live) for v in versions])


@router.post("/{version_id}/promote")
async def promote(
    version_id: str, request: Request, session: SessionDep, tenant_id: AdminTenantDep
) -> AdapterOut:
    """Serve this version as ``default`` from the next request on (no restart)."""
    # Through the placement: preloaded first, and the version this replaces is unloaded.
    placement: AdapterPlacement = request.app.state.placement
    version = await placement.promote(session, tenant_id=tenant_id, version_id=version_id)
    return AdapterOut.of(version, version.id)


@router.post("/rollback", responses={409: {"description": "nothing to roll back: base is served"}})
async def rollback(request: Request, session: SessionDep, tenant_id: AdminTenantDep) -> RollbackOut:
    """Go back to the version promoted before the live one (or to the base model)."""
    placement: AdapterPlacement = request.app.state.placement
    live = await placement.rollback(session, tenant_id=tenant_id)
    return RollbackOut(live=live.id if live is not None else registry.BASE)
