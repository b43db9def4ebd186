"""What serves a tenant's ``default`` model, and its live canary (tenant admins)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import AdminTenantDep, SessionDep
from api.schemas import RequestModel
from core import deployments
from core.canary import Arm
from core.deployments import MAX_CANARY_FRACTION, MIN_CANARY_FRACTION, Canary
from core.models import Deployment
from serving.gateway import AdapterPlacement

router = APIRouter(prefix="/v1/deployment", tags=["deployment"])


class VersionOut(BaseModel):
    version_id: str | None
    """None: the base model."""
    serving_name: str | None


class ArmOut(BaseModel):
    up: int
    down: int
    requests: int
    """Answers this arm gave since the canary began."""

    @classmethod
    def of(cls, arm: Arm) -> ArmOut:
        return cls(up=arm.up, down=arm.down, requests=arm.requests)


class CanaryOut(BaseModel):
    version_id: str
    fraction: float
    started_at: datetime
    arms: dict[Literal["current", "candidate"], ArmOut]
    p_better: float | None
    """P(the candidate's up-rate is above the current version's), thumbs from one user counted
    as one user's worth of evidence; None until both arms have thumbs."""

    @classmethod
    def of(cls, canary: Canary) -> CanaryOut:
        return cls(
            version_id=canary.version_id,
            fraction=canary.fraction,
            started_at=canary.started_at,
            arms={"current": ArmOut.of(canary.current), "candidate": ArmOut.of(canary.candidate)},
            p_better=canary.p_better,
        )


class DeploymentOut(BaseModel):
    object: Literal["deployment"] = "deployment"
    current: VersionOut
    canary: CanaryOut | None


class CanaryStart(RequestModel):
    version_id: str = Field(min_length=1, max_length=40)
    fraction: float = Field(
        default=0.1,
        ge=MIN_CANARY_FRACTION,
        le=MAX_CANARY_FRACTION,
        description="share of end users (by the requests' user field) the candidate answers",
    )


async def _deployment(session: SessionDep, tenant_id: str) -> DeploymentOut:
    deployment = await session.get(Deployment, tenant_id)
    current = VersionOut(version_id=None, serving_name=None)
    if deployment is not None and deployment.version_id is not None:
        version = await deployments.get_version(
            session, tenant_id=tenant_id, version_id=deployment.version_id
        )
        current = VersionOut(version_id=version.id, serving_name=version.serving_name)
    canary = await deployments.current_canary(session, tenant_id=tenant_id)
    return DeploymentOut(current=current, canary=CanaryOut.of(canary) if canary else None)


@router.get("")
async def get_deployment(session: SessionDep, tenant_id: AdminTenantDep) -> DeploymentOut:
    """What ``default`` serves, and the running canary with its arms' thumbs."""
    return await _deployment(session, tenant_id)


@router.post(
    "/canary",
    responses={
        404: {"description": "no such version of this tenant"},
        409: {"description": "a canary is running, or the version is live"},
    },
)
async def start_canary(
    body: CanaryStart, request: Request, session: SessionDep, tenant_id: AdminTenantDep
) -> DeploymentOut:
    """Let a version answer ``default`` for a share of end users, beside the live one (it is
    loaded on the serving tier first)."""
    placement: AdapterPlacement = request.app.state.placement
    await placement.start_canary(
        session, tenant_id=tenant_id, version_id=body.version_id, fraction=body.fraction
    )
    return await _deployment(session, tenant_id)


async def _conclude(
    request: Request, session: SessionDep, tenant_id: str, *, promote: bool
) -> DeploymentOut:
    placement: AdapterPlacement = request.app.state.placement
    await placement.conclude_canary(
        session, tenant_id=tenant_id, promote=promote, reason=deployments.BY_ADMIN[promote]
    )
    return await _deployment(session, tenant_id)


@router.post("/canary/promote", responses={409: {"description": "no canary is running"}})
async def promote_canary(
    request: Request, session: SessionDep, tenant_id: AdminTenantDep
) -> DeploymentOut:
    """Promote the canary's candidate now: it answers ``default`` for everyone."""
    return await _conclude(request, session, tenant_id, promote=True)


@router.post("/canary/abort", responses={409: {"description": "no canary is running"}})
async def abort_canary(
    request: Request, session: SessionDep, tenant_id: AdminTenantDep
) -> DeploymentOut:
    """End the canary: everyone gets the live version again; the candidate is rejected."""
    return await _conclude(request, session, tenant_id, promote=False)
