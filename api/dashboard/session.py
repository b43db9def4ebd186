"""Dashboard sessions: a signed, HttpOnly cookie that names the key that logged in.

The cookie holds the key's id (never the key), the tenant being viewed, a CSRF token and when it
was issued. Every request re-reads the key row, so revoking the key, suspending the tenant or
logging out (which ends every dashboard session the key opened until then, on the server, not
only in this browser) ends the session at once. itsdangerous signs and timestamps the cookie;
the secret comes from the settings or is made once and kept in the data dir.

The login form carries a token of its own, matched against a ``SameSite=Strict`` cookie set with
the form: another site cannot post its own key into it and log a visitor in as someone else.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.ext.asyncio import AsyncSession

from core.models import ApiKey, KeyRole, Tenant, TenantStatus
from core.settings import ApiSettings

COOKIE = "tuneloop_session"
LOGIN_COOKIE = "tuneloop_login"
CSRF_FIELD = "csrf_token"
LOGIN_FORM_SECONDS = 3600


@dataclass(frozen=True)
class DashboardSession:
    key_id: str
    role: KeyRole
    tenant_id: str | None
    """The tenant on screen: the key's own, or the one a platform key switched to."""
    csrf: str
    issued_at: float = 0.0
    """When the login happened (seconds since the epoch)."""

    @property
    def is_platform(self) -> bool:
        return self.role is KeyRole.platform


def _secret(settings: ApiSettings) -> str:
    if settings.session_secret is not None:
        return settings.session_secret.get_secret_value()
    path = Path(settings.data_dir) / "session-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting together agree on the first one's secret.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


class SessionCodec:
    def __init__(self, settings: ApiSettings) -> None:
        self._signer = URLSafeTimedSerializer(_secret(settings), salt="tuneloop-dashboard")
        self._login = URLSafeTimedSerializer(_secret(settings), salt="tuneloop-dashboard-login")
        self.max_age = int(settings.session_hours * 3600)
        self.secure = settings.cookie_secure

    def read(self, request: Request) -> DashboardSession | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._signer.loads(raw, max_age=self.max_age)
            return DashboardSession(
                key_id=str(data["k"]),
                role=KeyRole(data["r"]),
                tenant_id=data["t"],
                csrf=str(data["c"]),
                issued_at=float(data.get("i", 0.0)),
            )
        except (BadSignature, KeyError, ValueError, TypeError):
            return None

    def write(self, response: Response, session: DashboardSession) -> None:
        value = self._signer.dumps(
            {
                "k": session.key_id,
                "r": session.role.value,
                "t": session.tenant_id,
                "c": session.csrf,
                "i": session.issued_at,
            }
        )
        response.set_cookie(
            COOKIE,
            value,
            max_age=self.max_age,
            httponly=True,
            samesite="lax",
            secure=self.secure,
            path="/dashboard",
        )

    def clear(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path="/dashboard")

    def login_form_token(self, request: Request) -> str:
        """The login form's token: the browser's current one, or a new one."""
        return self._login_cookie(request) or secrets.token_urlsafe(24)

    def remember_login_form(self, response: Response, token: str) -> None:
        response.set_cookie(
            LOGIN_COOKIE,
            self._login.dumps(token),
            max_age=LOGIN_FORM_SECONDS,
            httponly=True,
            samesite="strict",  # never sent with another site's post
            secure=self.secure,
            path="/dashboard",
        )

    def login_form_ok(self, request: Request, presented: str | None) -> bool:
        expected = self._login_cookie(request)
        return (
            expected is not None
            and presented is not None
            and hmac.compare_digest(expected, presented)
        )

    def _login_cookie(self, request: Request) -> str | None:
        raw = request.cookies.get(LOGIN_COOKIE)
        if not raw:
            return None
        try:
            return str(self._login.loads(raw, max_age=LOGIN_FORM_SECONDS))
        except BadSignature:
            return None


def new_session(*, key_id: str, role: KeyRole, tenant_id: str | None) -> DashboardSession:
    return DashboardSession(
        key_id=key_id,
        role=role,
        tenant_id=tenant_id,
        csrf=secrets.token_urlsafe(24),
        issued_at=time.time(),
    )


def switch_tenant(session: DashboardSession, tenant_id: str) -> DashboardSession:
    return replace(session, tenant_id=tenant_id)


def csrf_ok(session: DashboardSession, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(session.csrf, presented)


async def still_valid(db: AsyncSession, session: DashboardSession) -> bool:
    """The key is not revoked and its tenant (or the platform key's chosen one) is active."""
    key = await db.get(ApiKey, session.key_id)
    if key is None or key.revoked_at is not None or key.role is not session.role:
        return False
    ended = key.sessions_valid_after
    if ended is not None and session.issued_at <= ended.timestamp():
        return False  # logged out since
    if key.role is not KeyRole.platform and key.tenant_id != session.tenant_id:
        return False
    if session.tenant_id is None:
        return True
    tenant = await db.get(Tenant, session.tenant_id)
    return tenant is not None and (
        tenant.status is TenantStatus.active or key.role is KeyRole.platform
    )
