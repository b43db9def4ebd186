"""The gateway's bookkeeping around an answer: every answer is an ``interactions`` row (so
feedback knows exactly what it rates) and its tokens land in the usage ledger; and the serving
tier follows the deployments: promoted versions are preloaded, retired ones unloaded."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core import deployments, interactions
from core.artifacts import ArtifactStore
from core.models import AdapterVersion, Deployment
from serving.registry import Resolved
from serving.types import AdapterRef, Choice, GenerationRequest, ServingBackend

__all__ = ["AdapterPlacement", "record_answer"]

log = logging.getLogger(__name__)


async def record_answer(
    session: AsyncSession,
    *,
    tenant_id: str,
    resolved: Resolved,
    request: GenerationRequest,
    choices: list[Choice],
    prompt_tokens: int,
    latency_ms: float,
    interaction_ids: list[str],
    endpoint: str,
) -> None:
    """``core.interactions.record_answer`` for a request as the serving tier saw it: a text
    completion's prompt is kept as one user message, and its sampling settings beside it."""
    messages: list[dict[str, Any]] = (
        [dict(m) for m in request.messages]
        if request.messages is not None
        else [{"role": "user", "content": request.prompt or ""}]
    )
    sampling = {
        k: v
        for k, v in asdict(request).items()
        if k not in ("adapter", "messages", "prompt", "fallback_to_base")
    }
    await interactions.record_answer(
        session,
        tenant_id=tenant_id,
        version_id=resolved.version.id if resolved.version else None,
        model=resolved.label,
        canary_arm=resolved.canary_arm,
        messages=messages,
        sampling={**sampling, "endpoint": endpoint},
        choices=choices,
        prompt_tokens=prompt_tokens,
        latency_ms=latency_ms,
        interaction_ids=interaction_ids,
    )


class AdapterPlacement:
    """Which adapters sit loaded on the serving tier: a promotion preloads the version it brings
    in before ``default`` points at it (its first request does not pay the load), and what a
    promotion or rollback retires is unloaded, so replicas do not fill up with dead adapters.

    Promotions made through an object of this class (the API, the dashboard, the Temporal
    worker's activities) do both. Where a promotion had no serving backend to talk to (a worker
    in another process than the local engine) the gateway notices on the next request: it
    remembers, per tenant, the serving name that ``default`` resolved to last, and when that
    changes it unloads the name left behind, in the background, and the request loads the new
    one. The first request for a tenant unloads the version its last promotion or rollback
    replaced (which may have happened before this process started). Best effort throughout: a
    failed preload or unload is logged and costs only time or cache space, never the promotion.

    ``backend`` None: only the pointers move (a worker with no serving tier it can reach).
    """

    def __init__(self, backend: ServingBackend | None, store: ArtifactStore) -> None:
        self._backend = backend
        self._store = store
        self._default: dict[str, str | None] = {}  # tenant -> serving name (None: base)
        self._tasks: set[asyncio.Task[None]] = set()

    async def served_default(
        self, session: AsyncSession, *, tenant_id: str, serving_name: str | None
    ) -> None:
        """``default`` resolved to ``serving_name`` for this tenant (called per request; a
        query only on a tenant's first request in this process)."""
        if tenant_id in self._default:
            before = self._default[tenant_id]
        else:
            before = await session.scalar(
                select(AdapterVersion.serving_name)
                .join(Deployment, Deployment.previous_version_id == AdapterVersion.id)
                .where(Deployment.tenant_id == tenant_id, AdapterVersion.tenant_id == tenant_id)
            )
        self._default[tenant_id] = serving_name
        if before is not None and before != serving_name:
            self.unload_soon(before)

    async def preload(self, version: AdapterVersion) -> bool:
        """Load ``version`` where it will be served; False (logged) when that failed."""
        if self._backend is None:
            return False
        ref = AdapterRef(version.serving_name, self._store.path(version.uri))
        try:
            await self._backend.load(ref)
        except Exception:  # the request path loads it again, or falls back, as its policy says
            log.warning("could not preload adapter %s", version.serving_name, exc_info=True)
            return False
        return True

    async def promote(
        self, session: AsyncSession, *, tenant_id: str, version_id: str
    ) -> AdapterVersion:
        """Preload the version, then ``deployments.promote``, then unload the one it replaced."""
        await self.preload(
            await deployments.get_version(session, tenant_id=tenant_id, version_id=version_id)
        )
        version, replaced = await deployments.promote_replacing(
            session, tenant_id=tenant_id, version_id=version_id
        )
        self._moved(tenant_id, replaced, version)
        return version

    async def rollback(self, session: AsyncSession, *, tenant_id: str) -> AdapterVersion | None:
        """``deployments.rollback`` at once (it is what an operator reaches for when the live
        version misbehaves), then load the version now live and unload the one rolled back."""
        live, replaced = await deployments.rollback_replacing(session, tenant_id=tenant_id)
        self._moved(tenant_id, replaced, live)
        if live is not None:
            await self.preload(live)
        return live

    async def start_canary(
        self, session: AsyncSession, *, tenant_id: str, version_id: str, fraction: float
    ) -> None:
        """Preload the candidate, then ``deployments.start_canary``."""
        await self.preload(
            await deployments.get_version(session, tenant_id=tenant_id, version_id=version_id)
        )
        await deployments.start_canary(
            session, tenant_id=tenant_id, version_id=version_id, fraction=fraction
        )

    async def conclude_canary(
        self,
        session: AsyncSession,
        *,
        tenant_id: str,
        promote: bool,
        reason: str,
        version_id: str | None = None,
    ) -> AdapterVersion:
        """``deployments.conclude_canary``, then unload what left: the version the candidate
        replaced, or the rejected candidate. (A promoted candidate is loaded already: it has
        been answering its share.)"""
        candidate, replaced = await deployments.conclude_canary(
            session, tenant_id=tenant_id, promote=promote, reason=reason, version_id=version_id
        )
        if promote:
            self._moved(tenant_id, replaced, candidate)
        else:
            self.unload_soon(candidate.serving_name)
        return candidate

    def unload_soon(self, serving_name: str) -> None:
        if self._backend is None:
            return
        task = asyncio.create_task(self._unload(serving_name))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the unloads under way (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _moved(
        self, tenant_id: str, replaced: AdapterVersion | None, live: AdapterVersion | None
    ) -> None:
        live_name = live.serving_name if live is not None else None
        self._default[tenant_id] = live_name
        if replaced is not None and replaced.serving_name != live_name:
            self.unload_soon(replaced.serving_name)

    async def _unload(self, serving_name: str) -> None:
        assert self._backend is not None  # unload_soon schedules nothing without one
        try:
            await self._backend.unload(serving_name)
        except Exception:  # logged, not raised: nobody waits for this, and a miss is harmless
            log.warning("could not unload retired adapter %s", serving_name, exc_info=True)
        else:
            log.info("unloaded retired adapter %s", serving_name)
