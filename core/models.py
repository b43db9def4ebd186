"""SQLAlchemy tables: the whole data model of ARCHITECTURE.md.

Every tenant-owned row carries ``tenant_id NOT NULL``; service functions always filter on it.
The schema is created only by Alembic (``migrations/``), never by ``create_all``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.ids import new_id

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact), JSON text on SQLite.
JsonType = JSON().with_variant(JSONB(), "postgresql")
# BIGINT autoincrement is not a rowid alias on SQLite; INTEGER is.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # VARCHAR + CHECK on every backend: portable, and adding a value is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TenantStatus(enum.StrEnum):
    active = "active"
    suspended = "suspended"


class BillingStatus(enum.StrEnum):
    """Whether the tenant's Stripe subscription is paid up (``active`` without Stripe)."""

    active = "active"
    suspended = "suspended"


class KeyRole(enum.StrEnum):
    platform = "platform"
    admin = "admin"
    product = "product"


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"


class AdapterStatus(enum.StrEnum):
    candidate = "candidate"
    promoted = "promoted"
    rejected = "rejected"
    retired = "retired"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[TenantStatus] = mapped_column(
        _enum(TenantStatus, "tenant_status"), default=TenantStatus.active
    )
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True, index=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    # Set by Stripe webhooks: a lapsed subscription suspends training (and, by the operator's
    # setting, inference) without touching ``status``, which is the operator's own switch.
    billing_status: Mapped[BillingStatus] = mapped_column(
        _enum(BillingStatus, "billing_status"), default=BillingStatus.active
    )
    billing_reason: Mapped[str | None] = mapped_column(Text)
    # When the Stripe event behind ``billing_status`` was created: Stripe does not deliver events
    # in order, and an older one must not undo a newer one.
    billing_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    policy: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """A credential. Only a visible prefix and a SHA-256 of the whole key are stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    # NULL only for platform keys (the operator's); a CHECK keeps the two in step.
    tenant_id: Mapped[str | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[KeyRole] = mapped_column(_enum(KeyRole, "key_role"))
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sessions_valid_after: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Dashboard sessions this key opened before this moment are over (set by logging out)."""


class Interaction(Base):
    """One served answer, captured at serve time so feedback knows exactly what it rates."""

    __tablename__ = "interactions"
    __table_args__ = (Index("ix_interactions_tenant_created", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("int"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    adapter_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    model: Mapped[str] = mapped_column(String(200))
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JsonType)
    completion: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    sampling: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    canary_arm: Mapped[str | None] = mapped_column(String(16))
    """``candidate`` or ``current`` when ``default`` answered during a canary; else None."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_feedback_tenant_id_id", "tenant_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("fb"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    interaction_id: Mapped[str | None] = mapped_column(
        ForeignKey("interactions.id", ondelete="SET NULL"), index=True
    )
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)
    prompt: Mapped[str | None] = mapped_column(Text)
    completion: Mapped[str | None] = mapped_column(Text)
    rating: Mapped[int] = mapped_column(SmallInteger)
    score: Mapped[float | None] = mapped_column(Float)
    comment: Mapped[str | None] = mapped_column(Text)
    correction: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str | None] = mapped_column(String(256))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # ``metadata`` is reserved on declarative classes; the column keeps the public name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    content_hash: Mapped[str] = mapped_column(String(64))
    counts: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    data_card: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("run"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    status: Mapped[RunStatus] = mapped_column(
        _enum(RunStatus, "run_status"), default=RunStatus.queued
    )
    method: Mapped[str] = mapped_column(String(16), default="auto")
    trigger: Mapped[str] = mapped_column(String(32), default="manual")
    workflow_id: Mapped[str | None] = mapped_column(String(255))
    dataset_id: Mapped[str | None] = mapped_column(String(40))
    adapter_version_id: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RunEvent(Base):
    """An event of a run, shaped like OpenAI fine-tuning job events."""

    __tablename__ = "run_events"
    __table_args__ = (Index("ix_run_events_run_id_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ad"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    sha256: Mapped[str] = mapped_column(String(64))
    # Derived from tenant + weights hash and never reused, so no serving cache can go stale.
    serving_name: Mapped[str] = mapped_column(String(128), unique=True)
    uri: Mapped[str] = mapped_column(String(1024))
    base_model: Mapped[str] = mapped_column(String(255))
    rank: Mapped[int] = mapped_column(Integer)
    status: Mapped[AdapterStatus] = mapped_column(
        _enum(AdapterStatus, "adapter_status"), default=AdapterStatus.candidate
    )
    eval_report: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    erased_data_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When an end user's data this version was trained on was erased (it stays servable; the
    tenant decides whether to retrain)."""


class Deployment(Base):
    """Which version answers a tenant's ``default`` model: a pointer, so rollback is a flip."""

    __tablename__ = "deployments"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    version_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id"))
    previous_version_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id"))
    canary_version_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id"))
    """A candidate answering ``default`` for a share of end users (``core.deployments``)."""
    canary_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    canary_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Thumbs on answers from then on count for the canary's arms."""
    canary_current_errors: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    canary_candidate_errors: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Requests the canary sent to each arm that failed without an answer (an answer is an
    interaction; these leave none), for the canary's health check."""
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class UsageRecord(Base):
    """The billing outbox: a ledger row first, reported to Stripe exactly once afterwards."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_unreported", "reported_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("use"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    meter: Mapped[str] = mapped_column(String(64))
    quantity: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class StripeEvent(Base):
    """Webhook dedupe: an event id is processed once."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
