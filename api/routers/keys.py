"""A tenant admin manages the tenant's own API keys."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import AdminTenantDep, PrincipalCacheDep, SessionDep
from api.schemas import KeyCreate, KeyCreated, KeyOut, ListOf
from core import keys
from core.models import KeyRole

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_key(body: KeyCreate, session: SessionDep, tenant_id: AdminTenantDep) -> KeyCreated:
    """Create a key. The secret is in the response once and never again."""
    issued = await keys.create_key(
        session, tenant_id=tenant_id, role=KeyRole(body.role), name=body.name
    )
    await session.commit()
    return KeyCreated(**KeyOut.of(issued.row).model_dump(), key=issued.secret)


@router.get("")
async def list_keys(session: SessionDep, tenant_id: AdminTenantDep) -> ListOf[KeyOut]:
    return ListOf[KeyOut](
        data=[KeyOut.of(k) for k in await keys.list_keys(session, tenant_id=tenant_id)]
    )


@router.delete("/{key_id}", responses={409: {"description": "the tenant's last active admin key"}})
async def revoke_key(
    key_id: str, session: SessionDep, tenant_id: AdminTenantDep, cache: PrincipalCacheDep
) -> KeyOut:
    """Revoke a key at once. The tenant's last active admin key cannot be revoked."""
    key = await keys.revoke_key(session, tenant_id=tenant_id, key_id=key_id)
    await session.commit()
    cache.forget(key_id=key.id)
    return KeyOut.of(key)
