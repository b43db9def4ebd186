"""Pydantic models of the HTTP edge, and the explicit functions mapping them to core types."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.feedback import DayStats, NewFeedback
from core.models import ApiKey, Feedback, Tenant, TenantStatus

MAX_TEXT = 32 * 1024
MAX_BATCH = 1000
MAX_MESSAGES = 200
MAX_METADATA_BYTES = 8 * 1024

Text = Annotated[str, Field(max_length=MAX_TEXT)]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are refused, and so is the NUL character,
    which PostgreSQL cannot store in text or JSON (it would be a 500 instead of a 4xx)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _has_nul(data):
            raise PydanticCustomError("nul_character", "text must not contain NUL (\\u0000)")
        return data


T = TypeVar("T")


class ListOf(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    next_cursor: str | None = None
    has_more: bool = False


# --- tenants and keys -----------------------------------------------------------------------------


class TenantCreate(RequestModel):
    slug: str = Field(min_length=1, max_length=63, examples=["acme"])
    name: str | None = Field(default=None, max_length=200)


class TenantPatch(RequestModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    status: TenantStatus | None = None


class TenantOut(BaseModel):
    object: Literal["tenant"] = "tenant"
    id: str
    slug: str
    name: str
    status: TenantStatus
    created_at: datetime

    @classmethod
    def of(cls, t: Tenant) -> TenantOut:
        return cls(id=t.id, slug=t.slug, name=t.name, status=t.status, created_at=t.created_at)


class KeyCreate(RequestModel):
    role: Literal["admin", "product"]
    name: str = Field(default="", max_length=200)


class KeyOut(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: str
    role: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(
            id=k.id,
            role=k.role.value,
            name=k.name,
            prefix=k.prefix,
            created_at=k.created_at,
            revoked_at=k.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The secret. Shown once; store it now.")


class TenantCreated(BaseModel):
    tenant: TenantOut
    admin_key: KeyCreated
    product_key: KeyCreated


# --- feedback -------------------------------------------------------------------------------------


def _parse_rating(value: object) -> int:
    if isinstance(value, str) and value.strip().lower() in ("up", "down", "1", "-1", "+1"):
        return 1 if value.strip().lower() in ("up", "1", "+1") else -1
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (1, -1):
        return int(value)
    raise PydanticCustomError(
        "rating", "rating must be 'up', 'down', 1 or -1, got {value}", {"value": repr(value)}
    )


Rating = Annotated[int, BeforeValidator(_parse_rating)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: Text
    name: str | None = Field(default=None, max_length=256)


class FeedbackItem(RequestModel):
    """One thumbs-up/down. Name an ``interaction_id`` the tenant got from an answer, or give the
    conversation inline (``messages`` or ``prompt``) plus the ``completion`` that was rated."""

    rating: Rating = Field(description="'up' / 'down', or 1 / -1")
    interaction_id: str | None = Field(default=None, max_length=40)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: Text | None = None
    completion: Text | None = None
    score: float | None = Field(default=None, ge=0, le=1, description="optional grade in [0, 1]")
    comment: Text | None = None
    correction: Text | None = Field(default=None, description="the answer the user wanted")
    user_id: str | None = Field(default=None, max_length=256)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    metadata: dict[str, Any] | None = Field(
        default=None, description=f"free-form JSON object, at most {MAX_METADATA_BYTES} bytes"
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value).encode()) > MAX_METADATA_BYTES:
            raise PydanticCustomError(
                "metadata_too_large", f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        return data  # checked field by field in _checked_text: the ingest path is hot

    @model_validator(mode="after")
    def _checked_text(self) -> FeedbackItem:
        texts = [
            self.prompt,
            self.completion,
            self.comment,
            self.correction,
            self.user_id,
            self.idempotency_key,
            self.interaction_id,
        ]
        texts += [m.content for m in self.messages or ()]
        if any(t is not None and "\x00" in t for t in texts) or (
            self.metadata is not None and _has_nul(self.metadata)
        ):
            raise PydanticCustomError("nul_character", "text must not contain NUL (\\u0000)")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> FeedbackItem:
        inline = self.messages is not None or self.prompt is not None
        if self.interaction_id is not None:
            if inline or self.completion is not None:
                raise PydanticCustomError(
                    "feedback_source",
                    "give either interaction_id, or messages/prompt with completion — not both",
                )
            return self
        if self.messages is not None and self.prompt is not None:
            raise PydanticCustomError("feedback_source", "give messages or prompt, not both")
        if not inline or self.completion is None:
            raise PydanticCustomError(
                "feedback_source",
                "an item needs interaction_id, or messages (or prompt) plus completion",
            )
        return self

    def to_core(self) -> NewFeedback:
        return NewFeedback(
            rating=self.rating,
            interaction_id=self.interaction_id,
            messages=[m.model_dump(exclude_none=True) for m in self.messages]
            if self.messages is not None
            else None,
            prompt=self.prompt,
            completion=self.completion,
            score=self.score,
            comment=self.comment,
            correction=self.correction,
            user_id=self.user_id,
            idempotency_key=self.idempotency_key,
            metadata=self.metadata,
        )


class FeedbackBatch(RequestModel):
    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        return data  # each item checks its own text

    items: list[FeedbackItem] = Field(min_length=1, max_length=MAX_BATCH)


def _item_or_batch(value: Any) -> str:
    return "batch" if isinstance(value, dict) and "items" in value else "item"


FeedbackBody = Annotated[
    Annotated[FeedbackItem, Tag("item")] | Annotated[FeedbackBatch, Tag("batch")],
    Discriminator(_item_or_batch),
]


class FeedbackOut(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    interaction_id: str | None
    rating: int
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    completion: str | None = None
    score: float | None = None
    comment: str | None = None
    correction: str | None = None
    user_id: str | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> FeedbackOut:
        return cls(**{k: v for k, v in row.items() if k != "tenant_id"})

    @classmethod
    def of(cls, fb: Feedback) -> FeedbackOut:
        return cls(
            id=fb.id,
            interaction_id=fb.interaction_id,
            rating=fb.rating,
            messages=fb.messages,
            prompt=fb.prompt,
            completion=fb.completion,
            score=fb.score,
            comment=fb.comment,
            correction=fb.correction,
            user_id=fb.user_id,
            idempotency_key=fb.idempotency_key,
            metadata=fb.meta,
            created_at=fb.created_at,
        )


class FeedbackAck(BaseModel):
    """One item of a batch: its id, and whether this request stored it or found it stored."""

    id: str
    idempotency_key: str | None
    status: Literal["created", "replayed"]


class FeedbackBatchOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackAck] = Field(description="one entry per item, in request order")
    created: int = Field(description="items stored by this request")
    replayed: int = Field(description="items whose idempotency_key was already stored")


class DayStatsOut(BaseModel):
    date: date
    total: int
    up: int
    down: int
    up_rate: float | None

    @classmethod
    def of(cls, s: DayStats) -> DayStatsOut:
        return cls(date=s.day, total=s.total, up=s.up, down=s.down, up_rate=s.up_rate)


class FeedbackStatsOut(BaseModel):
    object: Literal["feedback.stats"] = "feedback.stats"
    total: int
    up: int
    down: int
    up_rate: float | None
    days: list[DayStatsOut]
