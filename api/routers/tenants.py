"""Tenants, managed by the platform operator."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, status
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.service import RPCError

from api.deps import PlatformDep, PrincipalCacheDep, SessionDep
from api.orchestration import Orchestrator
from api.schemas import (
    KeyCreated,
    KeyOut,
    ListOf,
    TenantCreate,
    TenantCreated,
    TenantOut,
    TenantPatch,
)
from core import tenants
from core.errors import Unavailable
from core.keys import IssuedKey
from core.models import TenantStatus
from core.policy import policy_of
from core.stripe_billing import StripeBilling

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


def _created(issued: IssuedKey) -> KeyCreated:
    return KeyCreated(**KeyOut.of(issued.row).model_dump(), key=issued.secret)


async def _provision(
    stripe_billing: StripeBilling, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: str
) -> None:
    async with sessionmaker() as session:
        await stripe_billing.provision_quietly(session, tenant_id=tenant_id)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "the slug is taken"}},
)
async def create_tenant(
    body: TenantCreate,
    request: Request,
    session: SessionDep,
    _: PlatformDep,
    background: BackgroundTasks,
) -> TenantCreated:
    """Create a tenant with its first admin and product keys (shown once). With Stripe
    configured it also gets a Stripe customer and a metered subscription, made after the
    response is sent (the keys never wait on Stripe); if Stripe fails the tenant exists anyway,
    and the next usage-reporting pass creates them."""
    new = await tenants.create_tenant(session, slug=body.slug, name=body.name)
    stripe_billing: StripeBilling | None = request.app.state.stripe
    if stripe_billing is not None:
        background.add_task(
            _provision, stripe_billing, request.app.state.sessionmaker, new.tenant.id
        )
    return TenantCreated(
        tenant=TenantOut.of(new.tenant),
        admin_key=_created(new.admin_key),
        product_key=_created(new.product_key),
    )


@router.get("")
async def list_tenants(
    session: SessionDep,
    _: PlatformDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> ListOf[TenantOut]:
    rows = await tenants.list_tenants(session, limit=limit + 1, after=cursor)
    page = rows[:limit]
    more = len(rows) > limit
    return ListOf[TenantOut](
        data=[TenantOut.of(t) for t in page],
        has_more=more,
        next_cursor=page[-1].id if more else None,
    )


@router.get("/{tenant_id}")
async def get_tenant(tenant_id: str, session: SessionDep, _: PlatformDep) -> TenantOut:
    return TenantOut.of(await tenants.get_tenant(session, tenant_id=tenant_id))


@router.patch("/{tenant_id}")
async def update_tenant(
    tenant_id: str,
    body: TenantPatch,
    request: Request,
    session: SessionDep,
    _: PlatformDep,
    cache: PrincipalCacheDep,
) -> TenantOut:
    """Rename, suspend (``status: suspended``) or reactivate a tenant. Suspending pauses the
    tenant's run schedule; reactivating resumes it."""
    tenant = await tenants.update_tenant(
        session, tenant_id=tenant_id, name=body.name, status=body.status
    )
    cache.forget(tenant_id=tenant.id)
    if body.status is not None and policy_of(tenant.policy).schedule is not None:
        orchestrator: Orchestrator = request.app.state.orchestrator
        try:
            await orchestrator.pause_schedule(
                tenant.id,
                paused=body.status is TenantStatus.suspended,
                note=f"tenant {body.status.value} by the operator",
            )
        except (Unavailable, RPCError) as exc:
            # The status is saved, and start_run refuses a suspended tenant's runs anyway: the
            # schedule's state is a courtesy, not the guard. The operator hears.
            log.warning("could not update the schedule of tenant %s: %s", tenant.id, exc)
    return TenantOut.of(tenant)
