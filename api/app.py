"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard, metrics
from api.errors import error_response, install_error_handlers
from api.metrics import Metrics, MetricsMiddleware
from api.orchestration import Orchestrator
from api.rate_limits import Limits
from api.routers import (
    adapters,
    billing,
    deployment,
    export,
    feedback,
    health,
    inference,
    keys,
    runs,
    tenants,
    users,
)
from api.security_headers import SecurityHeaders
from core.artifacts import ArtifactStore
from core.billing import BillingConfig, InferenceGate
from core.db import create_engine, create_sessionmaker
from core.feedback import FeedbackWriter
from core.keys import PrincipalCache
from core.settings import ApiSettings
from core.stripe_billing import StripeBilling
from serving.backends import build_backend
from serving.gateway import AdapterPlacement, Gateway
from serving.types import ServingBackend


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before anything parses them.

    FastAPI's own ``max_body_size`` answers in plain text; this keeps the JSON error envelope.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            "payload_too_large",
            f"request body is larger than {self.max_bytes} bytes; send smaller batches",
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class RefuseNul:
    """A NUL in the URL (``%00`` in a query or path parameter) is refused with 422 before any
    route sees it: PostgreSQL cannot compare or store it, and would answer 500. (Bodies are
    checked by ``RequestModel``.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            b"%00" in scope.get("query_string", b"")
            or "\x00" in scope["path"]
            or b"%00" in scope.get("raw_path", b"")
        ):
            response = error_response(
                422, "invalid_input", "the URL must not contain NUL characters (%00)"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    settings: ApiSettings,
    *,
    engine: AsyncEngine | None = None,
    backend: ServingBackend | None = None,
) -> FastAPI:
    """Build the app. ``engine`` and ``backend`` may be injected (tests share them); otherwise
    they are built here and closed at shutdown. The local backend loads its model on first use."""
    own_engine = engine is None
    db = engine if engine is not None else create_engine(settings)
    own_backend = backend is None
    engine_backend = backend if backend is not None else build_backend(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.placement.drain()
        if own_backend:
            await engine_backend.close()
        if app.state.stripe is not None:
            await app.state.stripe.close()
        if own_engine:
            await db.dispose()

    app = FastAPI(
        title="tuneloop",
        version="0.1.0",
        description="Per-tenant LLM personalization: feedback in, promoted LoRA adapters out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = db
    app.state.sessionmaker = create_sessionmaker(db)
    app.state.principal_cache = PrincipalCache(ttl=settings.auth_cache_seconds)
    app.state.feedback_writer = FeedbackWriter(app.state.sessionmaker)
    app.state.backend = engine_backend
    app.state.store = ArtifactStore(settings.data_dir / "artifacts")

    async def tell_run(tenant_id: str) -> None:
        async with app.state.sessionmaker() as session:
            await app.state.orchestrator.deployment_changed(session, tenant_id=tenant_id)

    # Preloads what promotions bring in and unloads what they retire; a change made by hand
    # reaches the tenant's run watching a canary at once.
    app.state.placement = AdapterPlacement(engine_backend, app.state.store, on_change=tell_run)
    app.state.billing = BillingConfig.from_settings(settings)
    app.state.stripe = StripeBilling.from_settings(settings)  # None without STRIPE_API_KEY
    app.state.inference_gate = InferenceGate(
        app.state.sessionmaker, app.state.billing, ttl=settings.auth_cache_seconds
    )
    app.state.limits = Limits.from_settings(settings)
    app.state.gateway = Gateway(
        backend=engine_backend,
        store=app.state.store,
        sessionmaker=app.state.sessionmaker,
        gate=app.state.inference_gate,
        placement=app.state.placement,
        limits=app.state.limits,
    )
    app.state.orchestrator = Orchestrator(
        settings.temporal_address,
        base_model=settings.base_model,
        billing=app.state.billing,
        canary_poll_s=settings.canary_poll_s,
    )
    install_error_handlers(app)
    # Before the dashboard router, whose catch-all would otherwise answer for these files.
    app.mount("/dashboard/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    for module in (
        health,
        tenants,
        keys,
        feedback,
        inference,
        adapters,
        deployment,
        runs,
        billing,
        export,
        users,
    ):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RefuseNul)
    app.add_middleware(SecurityHeaders)
    # Outermost, so refusals by the body limit are counted too.
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
