"""A tenant's training policy (stored as JSON on the tenant, validated here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TrainingPolicy(BaseModel):
    """How and when a tenant's adapter is retrained and promoted."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["auto", "dpo", "kto", "grpo"] = "auto"
    """``auto``: DPO when there are enough preference pairs, else KTO."""
    min_feedback: int = Field(default=8, ge=2, le=1_000_000)
    """A run with fewer usable feedback items ends ``skipped``."""
    auto_train_after: int | None = Field(default=None, ge=1, le=1_000_000)
    """Start a run once this many feedback items arrived since the last run (None: never)."""
    schedule: str | None = Field(default=None, max_length=100)
    """A cron expression (5 fields, UTC) for scheduled runs, e.g. ``0 3 * * *``."""
    max_steps: int | None = Field(default=None, ge=1, le=100_000)
    epochs: float = Field(default=2.0, gt=0, le=20)
    rank: int = Field(default=16, ge=1, le=64)
    min_pref_improvement: float | None = Field(default=0.05, ge=-1, le=1)
    min_win_rate: float | None = Field(default=None, ge=0, le=1)
    max_regression_kl: float | None = Field(default=0.5, ge=0)
    max_ppl_increase: float | None = Field(default=0.25, ge=0)
    require_approval: bool = False
    """Promotion waits for an admin's approval (then times out, not promoted)."""
    approval_timeout_hours: float = Field(default=24, gt=0, le=24 * 30)
    fallback_to_base: bool = False
    """When the adapter cannot be served in time, answer from the base model (marked so)."""
    monthly_budget_usd: float | None = Field(default=None, ge=0, le=1_000_000_000)
    """The tenant's own spending cap per calendar month (UTC) in USD, over inference and
    training (None: no cap). A run whose estimated cost would pass it is refused."""
    inference_over_budget: Literal["allow", "block"] = "allow"
    """Once the month's spending reached ``monthly_budget_usd``: keep answering (``allow``) or
    refuse inference with 402 ``budget_exceeded`` (``block``)."""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not value.isprintable():
            raise ValueError("schedule must be printable text, like '0 3 * * *'")
        if len(value.split()) != 5:
            raise ValueError("schedule must be a 5-field cron expression like '0 3 * * *'")
        return " ".join(value.split())


def policy_of(raw: dict[str, object] | None) -> TrainingPolicy:
    return TrainingPolicy.model_validate(raw or {})
