"""API keys: random secrets with a visible prefix, stored as SHA-256, checked in constant time.

A key looks like ``tl_<role letter><10 chars>_<43 chars of secret>``. The part before the second
underscore is the lookup prefix (shown in listings); only the hash of the whole key is stored.
SHA-256 is the right hash here: the secret is 256 random bits, so there is nothing to brute-force
and a slow password hash would only cost latency on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from core.models import ApiKey, KeyRole, Tenant, TenantStatus

_ROLE_LETTER = {KeyRole.platform: "p", KeyRole.admin: "a", KeyRole.product: "k"}


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant always comes from here, never from the request."""

    key_id: str
    role: KeyRole
    tenant_id: str | None


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key. ``secret`` is shown once and never stored."""

    row: ApiKey
    secret: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret(role: KeyRole) -> tuple[str, str]:
    prefix = f"tl_{_ROLE_LETTER[role]}{secrets.token_hex(5)}"
    return prefix, f"{prefix}_{secrets.token_urlsafe(32)}"


def _prefix_of(secret: str) -> str | None:
    # The secret part is urlsafe base64 and may itself contain "_": split from the left.
    parts = secret.split("_", 2)
    if len(parts) != 3 or parts[0] != "tl" or not 2 <= len(parts[1]) <= 28 or not parts[2]:
        return None
    return f"tl_{parts[1]}"


async def create_key(
    session: AsyncSession, *, tenant_id: str | None, role: KeyRole, name: str = ""
) -> IssuedKey:
    """Add a key to the session (the caller commits). Platform keys have no tenant."""
    if (role is KeyRole.platform) != (tenant_id is None):
        raise InvalidInput("platform keys have no tenant; admin and product keys need one")
    prefix, secret = _new_secret(role)
    row = ApiKey(
        tenant_id=tenant_id, role=role, name=name, prefix=prefix, key_hash=hash_key(secret)
    )
    session.add(row)
    await session.flush()
    return IssuedKey(row=row, secret=secret)


async def authenticate(session: AsyncSession, secret: str) -> Principal:
    """The principal of a presented key, or ``Unauthenticated`` / ``PermissionDenied``."""
    prefix = _prefix_of(secret)
    if prefix is None:
        raise Unauthenticated("malformed API key: expected 'Authorization: Bearer tl_...'")
    row = (
        await session.execute(
            select(
                ApiKey.id,
                ApiKey.role,
                ApiKey.tenant_id,
                ApiKey.key_hash,
                ApiKey.revoked_at,
                Tenant.status,
            )
            .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.prefix == prefix)
        )
    ).first()
    # Compare even when no row matched, so timing does not tell which prefixes exist.
    expected = row.key_hash if row is not None else hash_key("")
    if not hmac.compare_digest(expected, hash_key(secret)) or row is None:
        raise Unauthenticated("unknown API key")
    if row.revoked_at is not None:
        raise Unauthenticated("this API key has been revoked")
    if row.tenant_id is not None and row.status is TenantStatus.suspended:
        raise PermissionDenied("this tenant is suspended", code="tenant_suspended")
    return Principal(key_id=row.id, role=row.role, tenant_id=row.tenant_id)


async def list_keys(session: AsyncSession, *, tenant_id: str) -> list[ApiKey]:
    rows = await session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)
    )
    return list(rows)


async def key_label(session: AsyncSession, *, key_id: str) -> str:
    """How a key signs what it did in logs people read: ``name (key id)``, or the id alone."""
    name = await session.scalar(select(ApiKey.name).where(ApiKey.id == key_id))
    return f"{name} ({key_id})" if name else key_id


async def revoke_key(session: AsyncSession, *, tenant_id: str, key_id: str) -> ApiKey:
    """Revoke one of the tenant's keys. Refuses to revoke its last active admin key."""
    key = await session.scalar(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.id == key_id)
    )
    if key is None:
        raise NotFound(f"no API key {key_id!r}")
    if key.revoked_at is not None:
        return key
    if key.role is KeyRole.admin:
        # Two admins revoking each other's keys at once must not leave the tenant with none:
        # a no-op write to the tenant's row before the count takes PostgreSQL's row lock and
        # SQLite's write lock (which a SELECT ... FOR UPDATE would not: SQLite ignores it, and
        # its driver starts the transaction only at the first write).
        await session.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id))
        admins = await session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.tenant_id == tenant_id,
                ApiKey.role == KeyRole.admin,
                ApiKey.revoked_at.is_(None),
            )
        )
        if (admins or 0) <= 1:
            raise Conflict(
                "this is the tenant's last active admin key; create another admin key first",
                code="last_admin_key",
            )
    await session.execute(
        update(ApiKey).where(ApiKey.id == key.id).values(revoked_at=datetime.now(UTC))
    )
    await session.refresh(key)
    return key


class PrincipalCache:
    """A short-lived, per-process memo of authenticated keys.

    Authentication is a database round trip on every request; on the ingest path that doubles the
    cost of a feedback POST. Entries live ``ttl`` seconds. This process drops them at once when it
    revokes a key or suspends a tenant; other API processes notice within ``ttl``.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, secret: str) -> Principal | None:
        if self.ttl <= 0:
            return None
        hit = self._entries.get(hash_key(secret))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, secret: str, principal: Principal) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[hash_key(secret)] = (time.monotonic() + self.ttl, principal)

    def forget(self, *, key_id: str | None = None, tenant_id: str | None = None) -> None:
        self._entries = {
            k: v
            for k, v in self._entries.items()
            if not (
                (key_id is not None and v[1].key_id == key_id)
                or (tenant_id is not None and v[1].tenant_id == tenant_id)
            )
        }
