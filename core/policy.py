"""A tenant's training policy (stored as JSON on the tenant, validated here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.canary import MAX_CANARY_FRACTION, MIN_CANARY_FRACTION


class TrainingPolicy(BaseModel):
    """How and when a tenant's adapter is retrained and promoted.

    Each attribute's docstring is its help text: in the OpenAPI schema and on the dashboard's
    settings form (``use_attribute_docstrings``). Training and gate settings reach the workflow
    by field name (``RunOptions``, then ``TrainSpec`` and ``GatePolicy``), so a new setting is
    declared here and in those dataclasses with the same name, nowhere else.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    method: Literal["auto", "dpo", "kto", "grpo"] = "auto"
    """Training method. auto: GRPO (the adapter writes new answers and learns from this
    tenant's thumbs judge) when the judge is trusted and there are enough distinct questions;
    else DPO when there are enough preference pairs (two answers to one question, one liked);
    else KTO, which learns from single thumbs. grpo falls back the same way when the judge may
    not decide. The run's log says which method ran and why."""
    grpo_min_questions: int = Field(default=64, ge=1, le=1_000_000)
    """auto picks GRPO only from this many distinct questions in the training feedback."""
    grpo_max_steps: int | None = Field(default=28, ge=1, le=100_000)
    """GRPO: at most this many training steps when max steps is empty (empty: epochs decide).
    A GRPO step writes four new answers per question and costs about five steps of DPO or KTO;
    28 keeps a run on SmolLM2 and two CPU cores within about 20 minutes."""
    answer_check_weight: float = Field(default=0.5, ge=0, le=10)
    """GRPO: weight of a reward checked by code, beside the judge's (which weighs 1): 1 for an
    answer, 0 for an empty one or a loop on one word (a refusal is an answer: the judge says
    whether users like it). 0 turns it off."""
    min_feedback: int = Field(default=8, ge=2, le=1_000_000)
    """A run with fewer usable feedback items ends skipped."""
    auto_train_after: int | None = Field(default=None, ge=1, le=1_000_000)
    """Start a run once this many feedback items arrived since the last run (empty: never)."""
    schedule: str | None = Field(default=None, max_length=100)
    """A cron expression (5 fields, UTC) for scheduled runs, e.g. 0 3 * * * for 03:00 daily."""
    max_steps: int | None = Field(default=None, ge=1, le=100_000)
    """Optimizer steps per run (empty: the number of epochs decides)."""
    epochs: float = Field(default=2.0, gt=0, le=20)
    """Passes over the training feedback when max steps is empty."""
    rank: int = Field(default=16, ge=1, le=64)
    """LoRA rank: the adapter's capacity. Higher learns more and costs more memory."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1e-2)
    """Step size of training. LoRA usually wants 1e-4 to 5e-4; too high and the adapter forgets
    how to answer (the capability guard then refuses it)."""
    beta: float = Field(default=0.1, gt=0, le=10)
    """How closely training holds the adapter to the base model: DPO's and KTO's beta (smaller
    lets each thumb move the adapter further before its loss is satisfied), GRPO's KL penalty.
    0.1 is TRL's default for DPO."""
    min_pref_improvement: float | None = Field(default=0.0, ge=-1, le=1)
    """Promote only if, on held-out feedback, the new adapter's score for telling liked from
    disliked answers beats the live version's by at least this, even at the low end of its
    95 % interval; or, when the thumbs judge's win rate already showed the new adapter better,
    if that feedback does not contradict it (the high end reaches this), unless the adapter was
    trained to please that judge (GRPO). Empty: skip this check."""
    min_win_rate: float | None = Field(default=0.5, ge=0, le=1)
    """Promote only if the tenant's thumbs judge prefers the new adapter's fresh answers to the
    live version's at least this often, at the low end of the 95 % interval (0.5: better than a
    tie, with confidence; empty: skip this check)."""
    min_judge_auroc: float = Field(default=0.65, ge=0.5, le=1)
    """The thumbs judge (a model of what this tenant's users like, learned from their thumbs)
    may decide only if it tells held-out liked from disliked answers at least this well (AUROC:
    0.5 is chance, 1 is perfect)."""
    max_capability_drop: float | None = Field(default=0.05, ge=0, le=1)
    """Reject an adapter that answers worse: on a fixed suite of instructions checked by code
    (word limits, lists, JSON, arithmetic, facts), its pass rate may fall below the base model's
    by at most this (0.05 = 5 points; empty: skip)."""
    max_regression_kl: float | None = Field(default=0.5, ge=0)
    """How far the adapter may drift from the base model on a shared set of answers, as mean
    per-token KL divergence in nats (empty: skip)."""
    max_ppl_increase: float | None = Field(default=0.25, ge=0)
    """How much worse the adapter may predict reference answers than the base model, as a
    relative perplexity increase (0.25 = 25 %; empty: skip)."""
    require_approval: bool = False
    """Promotion waits for an admin's approve or reject (run page, API or CLI), then times out,
    not promoted."""
    approval_timeout_hours: float = Field(default=24, gt=0, le=24 * 30)
    """How long a run waits for approval before it ends not promoted."""
    rollout: Literal["immediate", "canary"] = "immediate"
    """What becomes of an adapter the gate passed (and an admin approved, when asked).
    immediate: it is promoted. canary: it first answers a share of your end users (by the
    requests' user field) beside the live version, and is promoted when their thumbs show it
    better, rolled back when they show it worse or its answers fail or slow down. The run stays
    open meanwhile, so no other run starts."""
    canary_fraction: float = Field(default=0.1, ge=MIN_CANARY_FRACTION, le=MAX_CANARY_FRACTION)
    """Canary: the share of end users the new adapter answers."""
    canary_min_thumbs: int = Field(default=30, ge=5, le=1_000_000)
    """Canary: thumbs each side needs before the first look (later looks at 2, 4, 8... times
    this); each look spends half of the error budget left, so the chance of promoting an
    adapter that is not better stays under 5 % however many looks are taken."""
    canary_max_hours: float = Field(default=72, gt=0, le=24 * 30)
    """Canary: without a decision by then, the live version stays and the run says why."""
    fallback_to_base: bool = False
    """When the adapter cannot be served in time, answer from the base model (marked so)."""
    monthly_budget_usd: float | None = Field(default=None, ge=0, le=1_000_000_000)
    """The tenant's own spending cap per calendar month (UTC) in USD, over inference and
    training (empty: no cap). A run whose estimated cost would pass it is refused."""
    inference_over_budget: Literal["allow", "block"] = "allow"
    """Once the month's spending reached the budget: keep answering (allow) or refuse inference
    with 402 budget_exceeded (block)."""

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
