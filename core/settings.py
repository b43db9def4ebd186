"""Process settings, read from the environment once in ``main()`` / ``create_app()``.

One class per process kind; each is built explicitly and passed down. Nothing here runs at import.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What every tuneloop process needs."""

    # env_ignore_empty: ``DATABASE_URL=`` means "unset", not an empty URL.
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    data_dir: Path = Field(
        default=Path(".tuneloop"), validation_alias=AliasChoices("TUNELOOP_DATA_DIR", "data_dir")
    )
    """Database file (SQLite default), artifacts, converted models and Temporal's file live here."""

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    """SQLAlchemy URL. Unset: SQLite in the data dir. ``postgresql://`` URLs use asyncpg."""

    temporal_address: str | None = Field(
        default=None, validation_alias=AliasChoices("TEMPORAL_ADDRESS", "temporal_address")
    )
    """host:port of a Temporal frontend. Unset: ``tuneloop up`` starts the dev server."""

    base_model: str = Field(
        default="smollm2-135m-instruct",
        validation_alias=AliasChoices("TUNELOOP_BASE_MODEL", "base_model"),
    )
    """Registry name or local Hugging Face directory of the shared base model."""

    canary_poll_s: float = Field(
        default=60.0,
        ge=0.1,
        validation_alias=AliasChoices("TUNELOOP_CANARY_POLL_S", "canary_poll_s"),
    )
    """How often a run's live canary looks at its arms' thumbs (seconds; rollout: canary)."""

    serving_backend: Literal["local", "vllm"] = Field(
        default="local",
        validation_alias=AliasChoices("TUNELOOP_SERVING_BACKEND", "serving_backend"),
    )
    """Where completions are computed: in process (``local``) or on a vLLM pool (``vllm``)."""

    vllm_urls: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("TUNELOOP_VLLM_URLS", "vllm_urls")
    )
    """Comma-separated base URLs of the vLLM replicas (private network only)."""

    stripe_api_key: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_KEY", "stripe_api_key")
    )
    stripe_webhook_secret: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "stripe_webhook_secret"),
    )
    """Signing secret of the webhook endpoint (``whsec_...``); unset: the webhook answers 503."""
    stripe_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_BASE", "stripe_api_base")
    )
    """Override of ``https://api.stripe.com`` (a proxy, or the test suite's fake)."""
    stripe_meter_events_base: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_METER_EVENTS_BASE", "stripe_meter_events_base"),
    )
    """Override of ``https://meter-events.stripe.com``; set it together with STRIPE_API_BASE."""
    price_inference_per_1k: Decimal = Field(
        default=Decimal("0.002"),
        ge=0,
        validation_alias=AliasChoices(
            "TUNELOOP_PRICE_INFERENCE_PER_1K_TOKENS", "price_inference_per_1k"
        ),
    )
    """USD per 1,000 inference tokens (prompt + completion): the Stripe price and the cost shown."""
    price_training_per_1k: Decimal = Field(
        default=Decimal("0.01"),
        ge=0,
        validation_alias=AliasChoices(
            "TUNELOOP_PRICE_TRAINING_PER_1K_TOKENS", "price_training_per_1k"
        ),
    )
    """USD per 1,000 training tokens (tokens the optimizer saw)."""
    unpaid_blocks_inference: bool = Field(
        default=False,
        validation_alias=AliasChoices(
            "TUNELOOP_UNPAID_BLOCKS_INFERENCE", "unpaid_blocks_inference"
        ),
    )
    """A lapsed subscription always stops training; with this set it stops inference too."""
    billing_report_every_s: int = Field(
        default=60,
        ge=5,
        le=86_400,
        validation_alias=AliasChoices("TUNELOOP_BILLING_REPORT_EVERY_S", "billing_report_every_s"),
    )
    """How often the ReportUsage schedule sends unreported ledger rows to Stripe."""

    @property
    def stripe_configured(self) -> bool:
        return bool(self.stripe_api_key)

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError(
                "DATABASE_URL must be a sqlite:// or postgresql:// URL, "
                f"got scheme {value.split(':', 1)[0]!r}"
            )
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL: asyncpg for Postgres, aiosqlite for SQLite."""
        url = self.database_url
        if url is None:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'tuneloop.db').resolve()}"
        scheme, rest = url.split("://", 1)
        if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
            return f"postgresql+asyncpg://{rest}"
        if scheme == "sqlite":
            return f"sqlite+aiosqlite://{rest}"
        return url

    @property
    def is_embedded_sqlite(self) -> bool:
        return self.database_url is None


class ApiSettings(Settings):
    """Settings of the HTTP API process."""

    host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("TUNELOOP_HOST", "host"))
    port: int = Field(
        default=8000, ge=1, le=65535, validation_alias=AliasChoices("TUNELOOP_PORT", "port")
    )
    max_body_bytes: int = 16 * 1024 * 1024
    """Requests with a larger body are refused with 413 before they are parsed."""
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        validation_alias=AliasChoices("TUNELOOP_AUTH_CACHE_SECONDS", "auth_cache_seconds"),
    )
    """How long a process may reuse a key check. Revocation and suspension take effect at once
    in the process that makes them and within this many seconds in the others; 0 disables."""
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TUNELOOP_REDIS_URL", "redis_url")
    )
    """Redis (redis://host:6379/0) for the rate limits, shared by every API process. Unset: each
    process counts in its own memory (the embedded stack, one process)."""
    rate_limit_rps: float = Field(
        default=200,
        ge=0,
        validation_alias=AliasChoices("TUNELOOP_RATE_LIMIT_RPS", "rate_limit_rps"),
    )
    """Requests per second one API key may make, over any route (0: no limit)."""
    rate_limit_tokens_per_minute: int = Field(
        default=1_000_000,
        ge=0,
        validation_alias=AliasChoices(
            "TUNELOOP_RATE_LIMIT_TOKENS_PER_MINUTE", "rate_limit_tokens_per_minute"
        ),
    )
    """Answer tokens one API key may ask for per minute (``max_tokens`` times ``n``, counted when
    the request arrives; 0: no limit)."""
    max_in_flight_per_tenant: int = Field(
        default=32,
        ge=0,
        validation_alias=AliasChoices(
            "TUNELOOP_MAX_IN_FLIGHT_PER_TENANT", "max_in_flight_per_tenant"
        ),
    )
    """Generations one tenant may have running at once in one API process; more are refused
    with 429 rather than queued behind the others' (0: no limit)."""
    session_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TUNELOOP_SESSION_SECRET", "session_secret"),
    )
    """Signs dashboard session cookies. Unset: a random secret is made once and kept in the data
    dir, so restarts keep sessions; set it when several API processes share no data dir."""

    @field_validator("session_secret")
    @classmethod
    def _real_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Whoever knows the secret can forge any tenant admin's dashboard session: refuse the
        # example file's placeholder and anything short enough to guess.
        if value is None:
            return None
        secret = value.get_secret_value()
        if "change-me" in secret.lower() or len(secret) < 32:
            raise ValueError(
                "TUNELOOP_SESSION_SECRET must be a random secret of at least 32 characters, not "
                "the example's placeholder (e.g. openssl rand -base64 48)"
            )
        return value

    session_hours: float = Field(
        default=12,
        gt=0,
        le=24 * 30,
        validation_alias=AliasChoices("TUNELOOP_SESSION_HOURS", "session_hours"),
    )
    """A dashboard login lasts this long."""
    cookie_secure: bool = Field(
        default=False, validation_alias=AliasChoices("TUNELOOP_COOKIE_SECURE", "cookie_secure")
    )
    """Mark the session cookie ``Secure`` (set it when the dashboard is served over HTTPS)."""
