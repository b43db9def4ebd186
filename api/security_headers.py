"""Response headers that keep browsers and caches from misusing what the API and dashboard send.

- Every response: ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
- ``/v1/...`` (keys in creation responses, tenants' prompts and answers): ``Cache-Control:
  no-store`` unless a route set its own, so no proxy or browser cache keeps a copy.
- ``/dashboard`` pages: a Content-Security-Policy that allows only the dashboard's own scripts,
  styles and images and forbids framing (clickjacking of the approve and promote buttons).
  ``/docs`` keeps FastAPI's defaults: Swagger UI loads its own assets.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if path.startswith("/v1/"):
                    headers.setdefault("Cache-Control", "no-store")
                elif path.startswith("/dashboard") and not path.startswith("/dashboard/static/"):
                    headers.setdefault("Content-Security-Policy", DASHBOARD_CSP)
                    headers.setdefault("X-Frame-Options", "DENY")
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, with_headers)
