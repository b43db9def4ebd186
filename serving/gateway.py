"""The serving gateway: one object owns an answer's whole path (billing gate, resolving the
model with its canary arm, the operator's limits, generating with the tenant's fallback policy,
recording the answer as an ``interactions`` row so feedback knows exactly what it rates, and
metering its tokens). The API's inference routes only parse a request and shape the response.

Beside it, :class:`AdapterPlacement` keeps the serving tier following the deployments: promoted
versions are preloaded, retired ones unloaded."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import anyio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import deployments, interactions
from core.artifacts import ArtifactStore
from core.billing import InferenceGate
from core.deployments import CANDIDATE
from core.errors import DomainError
from core.models import AdapterVersion, Deployment
from serving.registry import DEFAULT, Resolved, resolve_model
from serving.types import (
    FALLBACK,
    AdapterRef,
    Choice,
    Generation,
    GenerationRequest,
    Served,
    ServingBackend,
)

__all__ = ["AdapterPlacement", "Answer", "Ask", "Gateway", "StreamedAnswer"]

log = logging.getLogger(__name__)


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
    ``on_change``: called with the tenant, in the background, after a promotion, rollback or
    canary end made through this object (the API tells the tenant's run watching a canary to
    look now, instead of at its next look; a failure is logged).
    """

    def __init__(
        self,
        backend: ServingBackend | None,
        store: ArtifactStore,
        *,
        on_change: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._backend = backend
        self._store = store
        self._on_change = on_change
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
        self._changed(tenant_id)
        return version

    async def rollback(self, session: AsyncSession, *, tenant_id: str) -> AdapterVersion | None:
        """``deployments.rollback`` at once (it is what an operator reaches for when the live
        version misbehaves), then load the version now live and unload the one rolled back."""
        live, replaced = await deployments.rollback_replacing(session, tenant_id=tenant_id)
        self._moved(tenant_id, replaced, live)
        self._changed(tenant_id)
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
        self._changed(tenant_id)
        return candidate

    def unload_soon(self, serving_name: str) -> None:
        if self._backend is not None:
            self._background(self._unload(serving_name))

    def _changed(self, tenant_id: str) -> None:
        if self._on_change is not None:
            self._background(self._tell(self._on_change, tenant_id))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _tell(on_change: Callable[[str], Awaitable[None]], tenant_id: str) -> None:
        try:
            await on_change(tenant_id)
        except Exception:  # the run's next look notices the change anyway
            log.warning(
                "could not tell tenant %s's run of a deployment change", tenant_id, exc_info=True
            )

    async def drain(self) -> None:
        """Wait for the background work under way: unloads, telling runs (shutdown, tests)."""
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


class GenerationLimits(Protocol):
    """The operator's limits the gateway applies to a generation (``api.rate_limits.Limits``;
    the per-request rate is the API's, over every route)."""

    def start_generation(self, tenant_id: str) -> Callable[[], None]:
        """Take one of the tenant's in-flight slots (or refuse); returns its release."""
        ...

    async def answer_tokens(self, key_id: str, tokens: int) -> None:
        """Reserve answer tokens for the key (or refuse)."""
        ...


@dataclass(frozen=True)
class Ask:
    """One inference request as the gateway takes it, parsed and checked by the API."""

    tenant_id: str
    key_id: str
    """The API key asking: its answer-token rate is what the limits count."""
    endpoint: str
    """``chat.completions`` or ``completions``, as recorded with the interaction."""
    model: str
    """``default``, ``base`` or one of the tenant's version ids."""
    user: str | None
    """The end user, which keeps them on one canary arm."""
    generation: GenerationRequest
    """What to generate; its ``adapter`` and ``fallback_to_base`` are the gateway's to set."""


@dataclass(frozen=True)
class Answer:
    resolved: Resolved
    """The version that answered (after a fallback, none: the base model did)."""
    generation: Generation
    interaction_ids: list[str]
    """One per choice: what feedback rates."""


@dataclass
class StreamedAnswer:
    """A streamed answer whose routing is done (the version that answers is known) and whose
    text is still to come: iterate ``pieces`` (text, then the finished ``Generation``), and call
    ``release`` when the response ends, however it ends (a client that left may never start the
    iteration). Closing ``pieces`` early records and meters what was produced so far."""

    resolved: Resolved
    interaction_id: str
    pieces: AsyncGenerator[str | Generation, None]
    release: Callable[[], None]


class Gateway:
    """An answer's whole path for a tenant's product key: admit (billing, suspension), resolve
    the model (the canary picks an arm per end user), follow promotions made elsewhere, count the
    operator's limits, generate (or fall back to base, as the tenant's policy says), record the
    answer and meter its tokens. A failed answer on a canary arm counts against that arm."""

    def __init__(
        self,
        *,
        backend: ServingBackend,
        store: ArtifactStore,
        sessionmaker: async_sessionmaker[AsyncSession],
        gate: InferenceGate,
        placement: AdapterPlacement,
        limits: GenerationLimits,
    ) -> None:
        self._backend = backend
        self._store = store
        self._sessionmaker = sessionmaker
        self._gate = gate
        self._placement = placement
        self._limits = limits

    async def answer(self, session: AsyncSession, ask: Ask) -> Answer:
        """Generate ``ask``'s choices and record them. ``session`` is closed before generating
        (the pool's connection is not held for seconds) and used again to record."""
        resolved, request = await self._route(session, ask)
        ids = interactions.new_interaction_ids(request.n)
        started = time.perf_counter()
        release = self._limits.start_generation(ask.tenant_id)
        try:
            await self._limits.answer_tokens(ask.key_id, request.max_tokens * request.n)
            try:
                generation = await self._backend.generate(request)
            except Exception as exc:
                await self._failed_on_canary(ask.tenant_id, resolved, exc)
                raise
        finally:
            release()
        if generation.served_by == FALLBACK:  # record what really answered
            resolved = replace(resolved, version=None, adapter=None, fallback=True)
        await _record(session, ask, resolved, request, generation, ids, started)
        return Answer(resolved, generation, ids)

    async def stream(self, session: AsyncSession, ask: Ask) -> StreamedAnswer:
        """Start ``ask``'s single answer. Routing and adapter loading finish here, before any
        text: their errors are this request's (503 ``adapter_unavailable``), and a fallback is
        known in time for the response headers."""
        resolved, request = await self._route(session, ask)
        [interaction_id] = interactions.new_interaction_ids(1)
        release = self._limits.start_generation(ask.tenant_id)
        try:
            await self._limits.answer_tokens(ask.key_id, request.max_tokens)
            pieces = self._backend.stream(request)
            served = await anext(pieces)
            if not isinstance(served, Served):
                raise TypeError(f"a backend's stream must begin with Served, not {served!r}")
        except BaseException as exc:
            release()
            await self._failed_on_canary(ask.tenant_id, resolved, exc)
            raise
        if served.served_by == FALLBACK:
            resolved = replace(resolved, version=None, adapter=None, fallback=True)
        return StreamedAnswer(
            resolved,
            interaction_id,
            self._recorded(ask, resolved, request, interaction_id, pieces),
            release,
        )

    async def _route(self, session: AsyncSession, ask: Ask) -> tuple[Resolved, GenerationRequest]:
        # Billing (unpaid subscription, budget) and the tenant's policy from a per-process memo:
        # no query per request.
        policy = await self._gate.admit(ask.tenant_id)
        resolved = await resolve_model(
            session, self._store, tenant_id=ask.tenant_id, model=ask.model, user=ask.user
        )
        if ask.model == DEFAULT and resolved.canary_arm != CANDIDATE:
            # A promotion or rollback elsewhere shows here: unload the old one. (A canary's
            # candidate is not what default points to: it must not unload the live version.)
            await self._placement.served_default(
                session,
                tenant_id=ask.tenant_id,
                serving_name=resolved.adapter.serving_name if resolved.adapter else None,
            )
        # Hand the connection back while the model works (seconds): otherwise concurrent
        # requests exhaust the pool. Recording the answer takes one again.
        await session.close()
        return resolved, replace(
            ask.generation, adapter=resolved.adapter, fallback_to_base=policy.fallback_to_base
        )

    async def _recorded(
        self,
        ask: Ask,
        resolved: Resolved,
        request: GenerationRequest,
        interaction_id: str,
        pieces: AsyncIterator[Served | str | Generation],
    ) -> AsyncGenerator[str | Generation, None]:
        started = time.perf_counter()
        sent: list[str] = []
        finished: Generation | None = None
        failed = False
        try:
            async for piece in pieces:
                if isinstance(piece, Served):
                    continue  # taken by stream()
                if isinstance(piece, Generation):
                    finished = piece
                else:
                    sent.append(piece)
                yield piece
        except Exception as exc:
            failed = True  # the engine failed: the answer is broken off, and nothing is billed
            await self._failed_on_canary(ask.tenant_id, resolved, exc)
            raise
        finally:
            # Also when the client went away mid-answer (this generator is cancelled or closed):
            # what it was sent was computed, so it is recorded and metered, shielded from the
            # cancellation. Without the engine's final counts, the prompt is estimated from its
            # length (~4 characters per token) and each piece counts as one token.
            if not failed and finished is None:
                finished = Generation(
                    choices=[Choice("".join(sent), "disconnected", len(sent))],
                    prompt_tokens=math.ceil(_prompt_chars(request) / 4),
                )
            if finished is not None:
                with anyio.CancelScope(shield=True):
                    async with self._sessionmaker() as session:
                        await _record(
                            session, ask, resolved, request, finished, [interaction_id], started
                        )

    async def _failed_on_canary(
        self, tenant_id: str, resolved: Resolved, exc: BaseException
    ) -> None:
        """A request the canary routed that got no answer counts against its arm (the canary's
        health check compares the arms' error rates). A client's mistake (a 4xx: too long, over
        a limit) is not the version's failure, nor is a client that left."""
        if resolved.canary_arm is None or resolved.canary_version_id is None:
            return
        if not isinstance(exc, Exception) or (isinstance(exc, DomainError) and exc.status < 500):
            return
        try:
            with anyio.CancelScope(shield=True):
                async with self._sessionmaker() as session:
                    await deployments.record_canary_failure(
                        session,
                        tenant_id=tenant_id,
                        canary_version_id=resolved.canary_version_id,
                        arm=resolved.canary_arm,
                    )
        except Exception:  # the request's own error is what its caller must hear, not this one
            log.warning("could not count a failed request against its canary arm", exc_info=True)


async def _record(
    session: AsyncSession,
    ask: Ask,
    resolved: Resolved,
    request: GenerationRequest,
    generation: Generation,
    interaction_ids: list[str],
    started: float,
) -> None:
    """The answer as ``interactions`` rows and its tokens metered: a text completion's prompt is
    kept as one user message, and the sampling settings beside it."""
    messages: list[dict[str, Any]] = (
        [dict(m) for m in request.messages]
        if request.messages is not None
        else [{"role": "user", "content": request.prompt or ""}]
    )
    # fields(), not asdict(): asdict deep-copies the messages only for them to be dropped.
    sampling = {
        f.name: getattr(request, f.name)
        for f in fields(request)
        if f.name not in ("adapter", "messages", "prompt", "fallback_to_base")
    }
    await interactions.record_answer(
        session,
        tenant_id=ask.tenant_id,
        version_id=resolved.version.id if resolved.version else None,
        model=resolved.label,
        canary_arm=resolved.canary_arm,
        messages=messages,
        sampling={**sampling, "endpoint": ask.endpoint},
        choices=generation.choices,
        prompt_tokens=generation.prompt_tokens,
        latency_ms=(time.perf_counter() - started) * 1000,
        interaction_ids=interaction_ids,
    )


def _prompt_chars(request: GenerationRequest) -> int:
    if request.messages is None:
        return len(request.prompt or "")
    return sum(len(str(m.get("content") or "")) for m in request.messages)
