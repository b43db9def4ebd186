"""Request dependencies: database session and the caller's principal, by role.

Every tenant-scoped route takes its tenant from ``Principal.tenant_id`` — never from the path or
body — so there is exactly one place where ownership is decided.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

# Dependencies are all ``async def``: FastAPI runs plain ``def`` ones in a thread pool, which
# costs more than the work they do.
from api.orchestration import Orchestrator
from api.rate_limits import Limits
from core.billing import BillingConfig
from core.errors import PermissionDenied, Unauthenticated
from core.feedback import FeedbackWriter
from core.keys import Principal, PrincipalCache, authenticate
from core.models import KeyRole
from serving.gateway import Gateway


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="A tuneloop API key: `tl_...`")


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer tl_...'")
    cache: PrincipalCache = request.app.state.principal_cache
    principal = cache.get(credentials.credentials)
    if principal is None:
        async with request.app.state.sessionmaker() as session:
            principal = await authenticate(session, credentials.credentials)
        cache.put(credentials.credentials, principal)
    # For the error handler: a refused lookup is logged with who asked (never with the key).
    request.state.principal = principal
    limits: Limits = request.app.state.limits
    await limits.request(principal.key_id)
    return principal


async def get_principal_cache(request: Request) -> PrincipalCache:
    cache: PrincipalCache = request.app.state.principal_cache
    return cache


PrincipalCacheDep = Annotated[PrincipalCache, Depends(get_principal_cache)]


async def require_platform(
    principal: Annotated[Principal, Security(get_principal, scopes=["platform"])],
) -> Principal:
    if principal.role is not KeyRole.platform:
        raise PermissionDenied("this route needs a platform (operator) key")
    return principal


async def require_admin_key(
    principal: Annotated[Principal, Security(get_principal, scopes=["admin"])],
) -> Principal:
    """A tenant admin key (routes that record who acted take it beside ``AdminTenantDep``)."""
    if principal.role is KeyRole.platform:
        raise PermissionDenied(
            "platform keys act on a tenant only through /v1/tenants/{tenant_id}/...; "
            "use a tenant admin key here"
        )
    if principal.role is not KeyRole.admin:
        raise PermissionDenied("this route needs a tenant admin key")
    return principal


async def require_admin(principal: Annotated[Principal, Depends(require_admin_key)]) -> str:
    """The tenant id of a tenant admin key."""
    assert principal.tenant_id is not None
    return principal.tenant_id


async def require_product(
    principal: Annotated[Principal, Security(get_principal, scopes=["product"])],
) -> str:
    """The tenant id of a tenant product (or admin) key."""
    if principal.role is KeyRole.platform:
        raise PermissionDenied("this route needs a tenant key (product or admin)")
    assert principal.tenant_id is not None
    return principal.tenant_id


PlatformDep = Annotated[Principal, Depends(require_platform)]
AdminTenantDep = Annotated[str, Depends(require_admin)]
AdminKeyDep = Annotated[Principal, Depends(require_admin_key)]
ProductTenantDep = Annotated[str, Depends(require_product)]


async def get_feedback_writer(request: Request) -> FeedbackWriter:
    writer: FeedbackWriter = request.app.state.feedback_writer
    return writer


FeedbackWriterDep = Annotated[FeedbackWriter, Depends(get_feedback_writer)]


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def orchestrator(request: Request) -> Orchestrator:
    """The process's Temporal-facing side (starts, signals and cancels runs)."""
    orch: Orchestrator = request.app.state.orchestrator
    return orch


def billing_config(request: Request) -> BillingConfig:
    config: BillingConfig = request.app.state.billing
    return config
