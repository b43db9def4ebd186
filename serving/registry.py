"""Adapter versions of a tenant as the serving tier sees them: registration (weights into the
artifact store) and what a request's ``model`` means, a running canary included. Promotion,
rollback and the canary's pointer live in ``core/deployments.py``."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.artifacts import ArtifactStore
from core.canary import in_canary
from core.deployments import CANDIDATE, CURRENT, get_version
from core.errors import InvalidInput, NotFound
from core.models import AdapterVersion, Deployment
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
    canary_arm: str | None = None
    """``candidate`` or ``current``: ``default`` answered while a canary runs."""
    canary_version_id: str | None = None
    """That canary's candidate: what identifies the canary a failure is charged to."""

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


async def resolve_model(
    session: AsyncSession,
    store: ArtifactStore,
    *,
    tenant_id: str,
    model: str,
    user: str | None = None,
) -> Resolved:
    """``base``, ``default`` (the promoted version, or base) or one of the tenant's version ids /
    serving names. Anything else, another tenant's versions included, is not found.

    While a canary runs, ``default`` is its candidate for a stable share of end users, hashed on
    ``user`` (the request's ``user`` field); a request without one is placed at random."""
    if model == BASE:
        return Resolved(None, None)
    arm: str | None = None
    canary: str | None = None
    if model == DEFAULT:
        deployment = await session.get(Deployment, tenant_id)
        if deployment is None:
            return Resolved(None, None)
        version_id = deployment.version_id
        if deployment.canary_version_id is not None:
            canary = deployment.canary_version_id
            key = user if user is not None else secrets.token_hex(8)
            on_candidate = in_canary(
                key, deployment.canary_fraction, salt=deployment.canary_version_id
            )
            arm = CANDIDATE if on_candidate else CURRENT
            if on_candidate:
                version_id = deployment.canary_version_id
        if version_id is None:
            return Resolved(None, None, canary_arm=arm, canary_version_id=canary)
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
    return Resolved(
        version,
        AdapterRef(version.serving_name, store.path(version.uri)),
        canary_arm=arm,
        canary_version_id=canary,
    )
