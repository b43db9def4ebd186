"""Everything the API and the workers agree on: queue names, workflow ids, and one frozen
dataclass in and one out for every workflow and activity. Importing this module pulls in
nothing else of tuneloop, so the API can start workflows without the worker's stack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CPU_QUEUE = "cpu"
"""Database work, dataset compilation, registration, promotion, metering."""
GPU_QUEUE = "gpu"
"""Training and evaluation: one activity at a time per worker (one accelerator)."""

PERSONALIZE_WORKFLOW = "PersonalizeTenant"
APPROVE_SIGNAL = "approve"
"""An admin lets a run waiting for approval promote its candidate (payload: ``Decision``)."""
REJECT_SIGNAL = "reject"
"""An admin turns the candidate down: it is kept ``rejected`` with the reason (``Decision``)."""
DEPLOYMENT_CHANGED_SIGNAL = "deployment_changed"
"""An admin promoted, rolled back or ended a canary by hand: a run watching its canary looks now
rather than at its next look (no payload; the look reads what happened)."""
STATE_QUERY = "state"
APPROVAL = "approval"
"""``progress["waiting_for"]`` of a run whose accepted candidate waits for an admin's approve or
reject signal; ``progress["waiting_until"]`` is the deadline (ISO 8601), after which the run ends
not promoted."""

CANARY = "canary"
"""``progress["waiting_for"]`` of a run whose promoted-by-the-gate candidate is in a live canary
(``rollout: canary``); ``progress["waiting_until"]`` is when the canary expires and the current
version stays."""


def personalize_workflow_id(tenant_id: str) -> str:
    """One personalization run per tenant at a time: the id is the lock."""
    return f"personalize/{tenant_id}"


def schedule_id(tenant_id: str) -> str:
    return f"personalize-schedule/{tenant_id}"


@dataclass(frozen=True)
class RunOptions:
    """How a run trains and decides; built from the tenant's policy when the run starts.

    Settings that come from ``TrainingPolicy`` carry its field names (the API copies them by
    name), and the activities hand them on by name to ``TrainSpec`` and ``GatePolicy``;
    ``tests/workflows/test_policy_fields.py`` checks that the three agree.
    """

    base_model: str = "smollm2-135m-instruct"
    method: str = "auto"
    grpo_min_questions: int = 64
    grpo_max_steps: int | None = 28
    answer_check_weight: float = 0.5
    min_feedback: int = 8
    max_steps: int | None = None
    epochs: float = 2.0
    rank: int = 16
    learning_rate: float = 2e-4
    beta: float = 0.1
    batch_size: int = 4
    checkpoint_every: int = 5
    min_pref_improvement: float | None = 0.0
    min_win_rate: float | None = 0.5
    min_judge_auroc: float = 0.65
    max_capability_drop: float | None = 0.05
    max_regression_kl: float | None = 0.5
    max_ppl_increase: float | None = 0.25
    require_approval: bool = False
    approval_timeout_hours: float = 24.0
    rollout: str = "immediate"
    canary_fraction: float = 0.1
    canary_min_thumbs: int = 30
    canary_max_hours: float = 72.0
    canary_poll_s: float = 60.0
    """How often a canary's thumbs are looked at (but no more often than every canary_max_hours
    / 800, which bounds the workflow's history)."""
    heartbeat_timeout_s: float = 120.0
    """A training step may take this long before a silent worker counts as lost."""
    eval_max_new_tokens: int = 96
    seed: int = 0


@dataclass(frozen=True)
class PersonalizeInput:
    tenant_id: str
    run_id: str | None = None
    """The ``training_runs`` row the API created; a scheduled run creates its own."""
    trigger: str = "manual"
    options: RunOptions = field(default_factory=RunOptions)


@dataclass(frozen=True)
class PersonalizeResult:
    run_id: str
    status: str  # succeeded | skipped | failed | cancelled
    reason: str | None = None
    version_id: str | None = None
    promoted: bool = False


@dataclass
class RunState:
    """What the ``state`` query returns while a run is in flight."""

    run_id: str
    stage: str = "queued"
    step: int = 0
    total_steps: int = 0
    reason: str | None = None
    version_id: str | None = None
    approved_by: str | None = None
    rejected_by: str | None = None
    rejection_reason: str | None = None


@dataclass(frozen=True)
class Decision:
    """An admin's answer to a run waiting for approval: the payload of both signals."""

    by: str
    """Who decided, for the run's log and reason: the admin key's name and id, or the CLI's
    operator."""
    reason: str | None = None
    """Why (a rejection's reason ends up on the rejected version)."""


@dataclass(frozen=True)
class StartRunInput:
    tenant_id: str
    run_id: str | None
    trigger: str
    workflow_id: str
    method: str


@dataclass(frozen=True)
class RunUpdate:
    """A status change of a run, with an event for its log."""

    tenant_id: str
    run_id: str
    status: str | None = None
    message: str = ""
    level: str = "info"
    reason: str | None = None
    dataset_id: str | None = None
    version_id: str | None = None
    method: str | None = None
    """The method training ran with (``auto`` resolved, or GRPO's fallback)."""
    data: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    """Keys merged into the run's ``progress``; a key whose value is None is removed."""


@dataclass(frozen=True)
class CompileInput:
    tenant_id: str
    run_id: str
    min_feedback: int


@dataclass(frozen=True)
class CompileOutput:
    dataset_id: str
    dataset_dir: str
    counts: dict[str, Any]


@dataclass(frozen=True)
class TrainInput:
    tenant_id: str
    run_id: str
    dataset_dir: str
    options: RunOptions


@dataclass(frozen=True)
class TrainOutput:
    adapter_dir: str
    sha256: str
    method: str
    steps: int
    examples: int
    tokens: int
    resumed_from_step: int
    runtime_s: float
    method_reason: str = ""
    """Which method ran and why (``auto``'s choice, or GRPO's fallback)."""
    cpu_s: float = 0.0
    """The worker process's CPU seconds from the start to the end of training: the training's,
    plus whatever else the process ran meanwhile (other activities on a shared worker)."""


@dataclass(frozen=True)
class EvaluateInput:
    tenant_id: str
    run_id: str
    dataset_dir: str
    adapter_dir: str
    options: RunOptions
    current_version_id: str | None = None
    """The live version the candidate must beat (None: the base model)."""
    current_adapter_dir: str | None = None


@dataclass(frozen=True)
class EvaluateOutput:
    report: dict[str, Any]
    current_version_id: str | None


@dataclass(frozen=True)
class RegisterInput:
    tenant_id: str
    run_id: str
    adapter_dir: str
    base_model: str
    report: dict[str, Any]
    accepted: bool
    reason: str


@dataclass(frozen=True)
class RegisterOutput:
    version_id: str
    serving_name: str


@dataclass(frozen=True)
class PromoteInput:
    tenant_id: str
    run_id: str
    version_id: str


@dataclass(frozen=True)
class RejectInput:
    """An admin rejected the run's candidate: keep it as ``rejected`` with ``reason``."""

    tenant_id: str
    run_id: str
    version_id: str
    reason: str


@dataclass(frozen=True)
class CanaryInput:
    """Start the canary of ``version_id`` (``fraction`` of end users), or look at it."""

    tenant_id: str
    run_id: str
    version_id: str
    fraction: float = 0.1
    min_thumbs: int = 30
    looks_done: int = 0
    """The previous verdict's (``core.canary.decide``)."""
    expired: bool = False
    """The canary's time is up: without a decision now, the current version stays."""
    abort: str | None = None
    """End the canary now, the current version staying, for this reason (a cancelled run)."""


@dataclass(frozen=True)
class CanaryVerdict:
    action: str
    """wait | promote | rollback | expire (``core.canary.Verdict``), or ended: the canary was no
    longer running (an admin promoted or aborted it; ``promoted`` says which)."""
    reason: str
    looks_done: int = 0
    promoted: bool = False
    """Whether the candidate is live now."""


@dataclass(frozen=True)
class UsageInput:
    tenant_id: str
    run_id: str
    tokens: int


REPORT_USAGE_WORKFLOW = "ReportUsage"
REPORT_USAGE_WORKFLOW_ID = "billing/report-usage"
"""One reporter at a time across the deployment: the id is the lock."""
REPORT_USAGE_SCHEDULE_ID = "billing/report-usage-schedule"


@dataclass(frozen=True)
class ReportUsageInput:
    """One pass of the usage reporter: ledger rows -> Stripe meter events."""

    batch_size: int = 200
    """Rows per activity call (each row is one meter event)."""
    max_batches: int = 50
    """Stop after this many batches; the schedule's next firing goes on (bounded history)."""


@dataclass(frozen=True)
class ReportBatchInput:
    limit: int = 200
    after: str | None = None
    """Only rows with a larger id: a pass pages through the backlog, so rows Stripe refuses
    cannot hold up the ones behind them."""


@dataclass(frozen=True)
class ReportBatchOutput:
    sent: int
    """Rows Stripe accepted in this batch, now marked reported."""
    pending: int
    """Rows of the batch left unreported (no Stripe subscription yet, too old, refused)."""
    last_id: str | None
    """The largest row id looked at (the next batch's ``after``); None: nothing was left."""
    retryable: str | None = None
    """Some rows met a busy or failing Stripe while others went through: the pass goes on to
    the next batch and fails at its end, so the schedule's next firing tries them again."""


@dataclass(frozen=True)
class ReportUsageResult:
    sent: int
    batches: int
    pending: int
