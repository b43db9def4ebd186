"""Domain errors with stable codes. The API maps them to HTTP in one handler."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a client can cause. ``code`` is stable; ``message`` says what to fix."""

    code = "error"
    status = 400

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class InvalidInput(DomainError):
    code = "invalid_input"
    status = 422


class UnknownReference(InvalidInput):
    """A valid body names an object the caller's tenant does not have (e.g. an interaction in a
    feedback batch). Another tenant's object is reported exactly like one that never existed."""

    code = "unknown_reference"


class ContextLengthExceeded(InvalidInput):
    """The prompt and the answer asked for do not fit in the model's context. 400, with
    OpenAI's code, which clients (LangChain, LiteLLM) recognize to trim and retry."""

    code = "context_length_exceeded"
    status = 400


class Unauthenticated(DomainError):
    code = "unauthenticated"
    status = 401


class PermissionDenied(DomainError):
    code = "permission_denied"
    status = 403


class NotFound(DomainError):
    code = "not_found"
    status = 404


class Conflict(DomainError):
    code = "conflict"
    status = 409


class QuotaExceeded(DomainError):
    code = "quota_exceeded"
    status = 402


class RateLimited(DomainError):
    """Too many requests (or answer tokens) for now; ``retry_after`` seconds until there is
    room again (the ``Retry-After`` header)."""

    code = "rate_limit_exceeded"
    status = 429

    def __init__(self, message: str, *, retry_after: float, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class Unavailable(DomainError):
    code = "unavailable"
    status = 503


class BudgetExceeded(QuotaExceeded):
    """The tenant's own monthly budget would be (or is) passed; ``details`` has the numbers."""

    code = "budget_exceeded"
    status = 402


class BillingSuspended(DomainError):
    """The tenant's Stripe subscription lapsed: paying (or the operator) lifts it."""

    code = "billing_suspended"
    status = 402


class TenantSuspended(PermissionDenied):
    """The operator suspended the tenant: its keys and its runs are refused until reactivated."""

    code = "tenant_suspended"
