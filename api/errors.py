"""One place that turns errors into the JSON envelope ``{"error": {code, message, details}}``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import DomainError, NotFound, RateLimited, UnknownReference

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _field_path(loc: tuple[Any, ...]) -> tuple[str, int | None]:
    """('body', 'batch', 'items', 3, 'rating') -> ('items[3].rating', 3)."""
    parts: list[str] = []
    index = None
    # Drop the request part and the tags of the single-item/batch union.
    for i, part in enumerate(loc):
        if i == 0 and part in ("body", "query", "path", "header"):
            continue
        if part in ("item", "batch") and i == 1:
            continue
        if isinstance(part, int):
            if parts and parts[-1] == "items" and index is None:
                index = part
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        else:
            parts.append(str(part))
    return ".".join(parts), index


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        field, index = _field_path(tuple(err.get("loc", ())))
        entry: dict[str, Any] = {"field": field or None, "message": err.get("msg", "invalid")}
        if index is not None:
            entry["index"] = index
        details.append(entry)
    return details


async def _on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    principal = getattr(request.state, "principal", None)
    if isinstance(exc, NotFound | UnknownReference) and principal is not None:
        # An authenticated caller naming something it does not own looks exactly like a miss to
        # the caller; the operator sees who probed what. Method and path only: no key, no body.
        log.warning(
            "not found for tenant %s (%s key %s): %s %r [%s]",
            principal.tenant_id or "-",
            principal.role.value,
            principal.key_id,
            request.method,
            request.url.path,
            exc.code,
        )
    headers = (
        {"Retry-After": str(math.ceil(exc.retry_after))} if isinstance(exc, RateLimited) else None
    )
    return error_response(exc.status, exc.code, exc.message, exc.details, headers=headers)


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        err = next(e for e in exc.errors() if e.get("type") == "json_invalid")
        reason = (err.get("ctx") or {}).get("error", "")
        return error_response(
            400, "malformed_json", f"the request body is not valid JSON: {reason}".rstrip(": ")
        )
    details = _validation_details(exc)
    first = details[0]
    where = f"{first['field']}: " if first.get("field") else ""
    message = f"invalid request: {where}{first['message']}"
    if len(details) > 1:
        message += f" (and {len(details) - 1} more problem(s), see details)"
    return error_response(422, "invalid_input", message, details)


async def _on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _on_database_down(_: Request, exc: Exception) -> JSONResponse:
    # A lost connection is the client's cue to retry; nothing was acknowledged.
    log.warning("database unavailable: %s", exc)
    return error_response(
        503,
        "unavailable",
        "the database is unavailable; nothing was stored, retry shortly",
        headers={"Retry-After": "1"},
    )


class ErrorBody(BaseModel):
    code: str
    """Stable, machine-readable: what went wrong."""
    message: str
    """What to change in the request."""
    details: Any = None
    """Per-field problems (``field``, ``message``, ``index`` in a batch), or null."""


class ErrorEnvelope(BaseModel):
    """Every 4xx/5xx answer of the API."""

    error: ErrorBody


_ERROR_DESCRIPTIONS = {
    400: "the body is not valid JSON",
    401: "missing, unknown or revoked API key",
    403: "this key's role may not use this route, or its tenant is suspended",
    404: "no such object for the caller's tenant (another tenant's objects included)",
    413: "the request body is too large",
    422: "invalid request; `details` says which fields",
    503: "a dependency (database, Temporal, serving tier) is unavailable; nothing was done, retry",
}


def _error_codes(operation: dict[str, Any]) -> set[int]:
    """The error statuses the shared machinery can answer on an operation, read off the
    operation itself: authentication and roles (and the key lookup needs the database), the body
    limit and JSON parsing, validation, path lookups. Route-specific ones (409, 402, ...) are
    declared with ``responses=`` on the route."""
    codes = set()
    if operation.get("security"):
        codes |= {401, 403, 503}
    if "requestBody" in operation:
        codes |= {400, 413, 422}
    parameters = operation.get("parameters", [])
    if any(p.get("in") == "path" for p in parameters):
        codes.add(404)
    if parameters:
        codes.add(422)
    return codes


def _document_errors(doc: dict[str, Any]) -> None:
    """Put the error envelope, for every status an operation can answer with, into the OpenAPI
    document (FastAPI would otherwise document 422 as its own, different validation body)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(envelope.pop("$defs", {}))
    schemas["ErrorEnvelope"] = envelope
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code in sorted(_error_codes(operation)):
                responses.setdefault(str(code), {"description": _ERROR_DESCRIPTIONS[code]})
            for code, response in responses.items():
                if code[:1] in ("4", "5"):
                    response["content"] = content
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)


async def _on_database_error(request: Request, exc: Exception) -> JSONResponse:
    # A connection cut in the middle of a statement arrives as a plain DBAPIError (asyncpg's
    # "connection was closed in the middle of operation"); SQLAlchemy marks it as a disconnect.
    # Any other database error is a bug: let it be the 500 it is.
    assert isinstance(exc, DBAPIError)
    if exc.connection_invalidated:
        return await _on_database_down(request, exc)
    raise exc


def install_error_handlers(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_errors(generate())
        return app.openapi_schema  # type: ignore[return-value]  # set by generate()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's way to extend the document
    app.add_exception_handler(DomainError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(OperationalError, _on_database_down)
    app.add_exception_handler(InterfaceError, _on_database_down)
    app.add_exception_handler(PoolTimeout, _on_database_down)
    app.add_exception_handler(DBAPIError, _on_database_error)
    app.add_exception_handler(ConnectionError, _on_database_down)
