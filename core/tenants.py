"""Tenants: creation (with their first keys), lookup, suspension."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, InvalidInput, NotFound
from core.keys import IssuedKey, create_key
from core.models import KeyRole, Tenant, TenantStatus

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class NewTenant:
    tenant: Tenant
    admin_key: IssuedKey
    product_key: IssuedKey


def check_slug(slug: str) -> str:
    if not SLUG_RE.fullmatch(slug):
        raise InvalidInput(
            "slug must be 1-63 characters of lower-case letters, digits and inner hyphens, "
            f"got {slug!r}",
            details={"field": "slug"},
        )
    return slug


async def create_tenant(session: AsyncSession, *, slug: str, name: str | None = None) -> NewTenant:
    """Create a tenant with one admin and one product key, and commit."""
    check_slug(slug)
    tenant = Tenant(slug=slug, name=name or slug, policy={})
    session.add(tenant)
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise Conflict(f"a tenant with slug {slug!r} already exists", code="slug_taken") from None
    admin = await create_key(session, tenant_id=tenant.id, role=KeyRole.admin, name="admin")
    product = await create_key(session, tenant_id=tenant.id, role=KeyRole.product, name="product")
    await session.commit()
    return NewTenant(tenant=tenant, admin_key=admin, product_key=product)


async def get_tenant(session: AsyncSession, *, tenant_id: str) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return tenant


async def get_tenant_by_slug(session: AsyncSession, *, slug: str) -> Tenant:
    tenant = await session.scalar(select(Tenant).where(Tenant.slug == slug))
    if tenant is None:
        raise NotFound(f"no tenant with slug {slug!r}")
    return tenant


async def list_tenants(
    session: AsyncSession, *, limit: int, after: str | None = None
) -> list[Tenant]:
    query = select(Tenant).order_by(Tenant.id).limit(limit)
    if after is not None:
        query = query.where(Tenant.id > after)
    return list(await session.scalars(query))


async def update_tenant(
    session: AsyncSession,
    *,
    tenant_id: str,
    name: str | None = None,
    status: TenantStatus | None = None,
) -> Tenant:
    tenant = await get_tenant(session, tenant_id=tenant_id)
    if name is not None:
        tenant.name = name
    if status is not None:
        tenant.status = status
    await session.commit()
    return tenant
