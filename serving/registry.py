"""Adapter versions of a tenant: registration, the ``model`` a request names, promotion and
rollback. Promotion and rollback only move the ``deployments`` pointer; names never change."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.artifacts import ArtifactStore
from core.errors import Conflict, InvalidInput, NotFound
from core.models import AdapterStatus, AdapterVersion, Deployment
from serving.names import serving_name
from serving.types import FALLBACK, AdapterRef

BASE = "base"
DEFAULT = "default"


@dataclass(frozen=True)
class Resolved:
    """What a request's ``model`` means for this tenant."""

    version: AdapterVersion | None  # None: the base model
    adapter: AdapterRef | None
    fallback: bool = False
    """The adapter could not be served in time and the base model answered instead."""

    @property
    def label(self) -> str:
        if self.fallback:
            return FALLBACK
        return self.version.id if self.version is not None else BASE


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def register_adapter(
    session: AsyncSession,
    store: ArtifactStore,
    *,
    tenant_id: str,
    adapter_dir: Path,
    base_model: str,
    run_id: str | None = None,
    eval_report: dict[str, Any] | None = None,
) -> AdapterVersion:
    """Copy an adapter's PEFT files into the store and record a candidate version (committed).

    Idempotent: the same weights for the same tenant are the same version, so a retried
    registration never creates a second one.
    """
    weights = adapter_dir / "adapter_model.safetensors"
    config_path = adapter_dir / "adapter_config.json"
    if not weights.is_file() or not config_path.is_file():
        raise InvalidInput(f"{adapter_dir} is not a PEFT adapter directory")
    sha = _sha256(weights)
    name = serving_name(tenant_id, sha)
    existing = await session.scalar(
        select(AdapterVersion).where(AdapterVersion.serving_name == name)
    )
    if existing is not None:
        return existing
    key = store.put_adapter(tenant_id, name, adapter_dir)
    rank = int(json.loads(config_path.read_text()).get("r", 0))
    version = AdapterVersion(
        tenant_id=tenant_id,
        run_id=run_id,
        sha256=sha,
        serving_name=name,
        uri=key,
        base_model=base_model,
        rank=rank,
        eval_report=eval_report,
    )
    session.add(version)
    await session.commit()
    return version


async def get_version(session: AsyncSession, *, tenant_id: str, version_id: str) -> AdapterVersion:
    version = await session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.tenant_id == tenant_id, AdapterVersion.id == version_id
        )
    )
    if version is None:
        raise NotFound(f"no adapter version {version_id!r}")
    return version


async def list_versions(session: AsyncSession, *, tenant_id: str) -> list[AdapterVersion]:
    rows = await session.scalars(
        select(AdapterVersion)
        .where(AdapterVersion.tenant_id == tenant_id)
        .order_by(AdapterVersion.id.desc())
    )
    return list(rows)


async def live_version_id(session: AsyncSession, *, tenant_id: str) -> str | None:
    return await session.scalar(
        select(Deployment.version_id).where(Deployment.tenant_id == tenant_id)
    )


async def resolve_model(
    session: AsyncSession, store: ArtifactStore, *, tenant_id: str, model: str
) -> Resolved:
    """``base``, ``default`` (the promoted version, or base) or one of the tenant's version ids /
    serving names. Anything else, another tenant's versions included, is not found."""
    if model == BASE:
        return Resolved(None, None)
    if model == DEFAULT:
        version_id = await live_version_id(session, tenant_id=tenant_id)
        if version_id is None:
            return Resolved(None, None)
        version = await get_version(session, tenant_id=tenant_id, version_id=version_id)
    else:
        found = await session.scalar(
            select(AdapterVersion).where(
                AdapterVersion.tenant_id == tenant_id,
                (AdapterVersion.id == model) | (AdapterVersion.serving_name == model),
            )
        )
        if found is None:
            raise NotFound(
                f"the model {model!r} does not exist: use 'default', 'base' or one of your "
                "adapter version ids (GET /v1/models)",
                code="model_not_found",
            )
        version = found
    return Resolved(version, AdapterRef(version.serving_name, store.path(version.uri)))


async def promote(session: AsyncSession, *, tenant_id: str, version_id: str) -> AdapterVersion:
    """Make ``version_id`` what ``default`` serves (committed). The old one is retired."""
    version, _ = await promote_replacing(session, tenant_id=tenant_id, version_id=version_id)
    return version


async def promote_replacing(
    session: AsyncSession, *, tenant_id: str, version_id: str
) -> tuple[AdapterVersion, AdapterVersion | None]:
    """``promote``, also returning the version it replaced (None: the base model, or nothing
    changed), read under the deployment's row lock: of two promotions at once, each gets the
    one it really replaced."""
    version = await get_version(session, tenant_id=tenant_id, version_id=version_id)
    deployment = await session.get(Deployment, tenant_id, with_for_update=True)
    if deployment is None:
        deployment = Deployment(tenant_id=tenant_id)
        session.add(deployment)
    if deployment.version_id == version.id:
        return version, None
    now = datetime.now(UTC)
    old = None
    if deployment.version_id is not None:
        old = await get_version(session, tenant_id=tenant_id, version_id=deployment.version_id)
        old.status = AdapterStatus.retired
    deployment.previous_version_id = deployment.version_id
    deployment.version_id = version.id
    version.status = AdapterStatus.promoted
    version.promoted_at = now
    await session.commit()
    return version, old


async def rollback(session: AsyncSession, *, tenant_id: str) -> AdapterVersion | None:
    """Serve the version promoted before the live one (or the base model if there was none).

    Returns the version now live (None: base). The rolled-back version is retired with a reason.
    """
    live, _ = await rollback_replacing(session, tenant_id=tenant_id)
    return live


async def rollback_replacing(
    session: AsyncSession, *, tenant_id: str
) -> tuple[AdapterVersion | None, AdapterVersion]:
    """``rollback``, also returning the version rolled back (read under the row lock)."""
    deployment = await session.get(Deployment, tenant_id, with_for_update=True)
    if deployment is None or deployment.version_id is None:
        raise Conflict("nothing to roll back: the base model is being served", code="no_rollback")
    current = await get_version(session, tenant_id=tenant_id, version_id=deployment.version_id)
    earlier = await session.scalar(
        select(AdapterVersion)
        .where(
            AdapterVersion.tenant_id == tenant_id,
            AdapterVersion.id != current.id,
            AdapterVersion.promoted_at.is_not(None),
            AdapterVersion.promoted_at <= current.promoted_at,
            AdapterVersion.status == AdapterStatus.retired,
        )
        .order_by(AdapterVersion.promoted_at.desc())
        .limit(1)
    )
    current.status = AdapterStatus.retired
    current.reason = "rolled back"
    deployment.previous_version_id = current.id
    deployment.version_id = earlier.id if earlier is not None else None
    if earlier is not None:
        earlier.status = AdapterStatus.promoted
    await session.commit()
    return earlier, current
