"""The API's handle on Temporal: a lazily connected client, and starting/cancelling runs.

Only ``workflows.contracts`` is imported from the workflow layer, so the API process never loads
the worker's stack (torch, TRL) to start a run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import fields
from typing import Any

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    WorkflowHandle,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from core import runs
from core.billing import BillingConfig, InferenceGate
from core.errors import (
    BillingSuspended,
    BudgetExceeded,
    Conflict,
    InvalidInput,
    NotFound,
    Unavailable,
)
from core.models import Feedback, RunStatus, Tenant, TrainingRun
from core.policy import TrainingPolicy, policy_of
from workflows.contracts import (
    APPROVAL,
    APPROVE_SIGNAL,
    CANARY,
    CPU_QUEUE,
    DEPLOYMENT_CHANGED_SIGNAL,
    PERSONALIZE_WORKFLOW,
    REJECT_SIGNAL,
    Decision,
    PersonalizeInput,
    RunOptions,
    personalize_workflow_id,
    schedule_id,
)

log = logging.getLogger(__name__)

AUTO_CHECK_EVERY_S = 5.0
MAX_DECISION_REASON = 1000
"""Characters of an admin's reason for approving or rejecting a candidate."""


def waiting_for(run: TrainingRun) -> str | None:
    """What an active run waits on: ``approval`` (an admin), ``canary`` (its live canary's
    users), or None."""
    what = (run.progress or {}).get("waiting_for")
    return what if run.status in runs.ACTIVE and what in (APPROVAL, CANARY) else None


def awaiting_approval(run: TrainingRun) -> bool:
    """The run's accepted candidate waits for an admin's approve or reject (and nobody has
    answered yet)."""
    return waiting_for(run) == APPROVAL


class Orchestrator:
    def __init__(
        self,
        address: str | None,
        *,
        base_model: str,
        billing: BillingConfig | None = None,
        canary_poll_s: float = RunOptions.canary_poll_s,
    ) -> None:
        self.address = address
        self.base_model = base_model
        self.canary_poll_s = canary_poll_s
        self.billing = billing or BillingConfig()
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._checked: dict[str, float] = {}

    async def client(self) -> Client:
        if self.address is None:
            raise Unavailable(
                "orchestration is not configured: set TEMPORAL_ADDRESS or run `tuneloop up`",
                code="orchestration_unavailable",
            )
        async with self._lock:
            if self._client is None:
                try:
                    self._client = await Client.connect(self.address)
                except (RuntimeError, OSError) as exc:
                    # The address is the operator's business, not a client's: it goes to the log.
                    log.warning("cannot reach Temporal at %s: %s", self.address, exc)
                    raise Unavailable(
                        "cannot reach the orchestration service (Temporal); retry later, or "
                        "ask the operator (the API's log says why)",
                        code="orchestration_unavailable",
                    ) from exc
        return self._client

    def options(self, policy: TrainingPolicy, method: str | None = None) -> RunOptions:
        """The run's options: every policy setting the workflow knows, copied by field name."""
        shared = {
            f.name: getattr(policy, f.name)
            for f in fields(RunOptions)
            if f.name in TrainingPolicy.model_fields
        }
        operator = {"base_model": self.base_model, "canary_poll_s": self.canary_poll_s}
        return RunOptions(**{**shared, **operator, "method": method or policy.method})

    async def start_run(
        self,
        session: AsyncSession,
        *,
        tenant_id: str,
        trigger: str,
        method: str | None = None,
        options: RunOptions | None = None,
    ) -> tuple[TrainingRun, bool]:
        """Start a run, or return the one in flight. Returns ``(run, started)``."""
        tenant = await session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        running = await runs.active_run(session, tenant_id=tenant_id)
        if running is not None:  # e.g. a scheduled run, whose workflow id differs
            return running, False
        # Before any row or workflow exists: a suspended tenant (403), a lapsed subscription or
        # a run over the tenant's budget (402) is refused here, manual and auto-start alike.
        await runs.check_may_train(session, tenant_id=tenant_id, billing=self.billing)
        client = await self.client()
        opts = options or self.options(policy_of(tenant.policy), method)
        workflow_id = personalize_workflow_id(tenant_id)
        run = TrainingRun(
            tenant_id=tenant_id, trigger=trigger, method=opts.method, workflow_id=workflow_id
        )
        session.add(run)
        await session.commit()  # the row exists before the workflow can touch it
        try:
            await client.start_workflow(
                PERSONALIZE_WORKFLOW,
                PersonalizeInput(tenant_id=tenant_id, run_id=run.id, trigger=trigger, options=opts),
                id=workflow_id,
                task_queue=CPU_QUEUE,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            )
        except WorkflowAlreadyStartedError:
            await session.delete(run)
            await session.commit()
            running = await runs.active_run(session, tenant_id=tenant_id)
            if running is None:
                raise Unavailable("a run for this tenant is starting; retry in a moment") from None
            return running, False
        except RPCError as exc:
            runs.finish(run, RunStatus.failed, f"could not start: {exc.message}")
            await session.commit()
            raise Unavailable(f"Temporal refused the run: {exc.message}") from exc
        return run, True

    async def sync_schedule(self, tenant_id: str, policy: TrainingPolicy) -> None:
        """Create, update or delete the tenant's Temporal Schedule to match ``policy.schedule``."""
        client = await self.client()
        handle = client.get_schedule_handle(schedule_id(tenant_id))
        if policy.schedule is None:
            try:
                await handle.delete()
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
            return
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                PERSONALIZE_WORKFLOW,
                PersonalizeInput(
                    tenant_id=tenant_id, trigger="schedule", options=self.options(policy)
                ),
                # Temporal appends the fire time to this id; start_run enforces one run per
                # tenant across manual and scheduled runs.
                id=personalize_workflow_id(tenant_id),
                task_queue=CPU_QUEUE,
            ),
            spec=ScheduleSpec(cron_expressions=[policy.schedule]),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        try:
            await client.create_schedule(schedule_id(tenant_id), schedule)
        except ScheduleAlreadyRunningError:
            await handle.update(lambda _: ScheduleUpdate(schedule=schedule))

    async def pause_schedule(self, tenant_id: str, *, paused: bool, note: str) -> None:
        """Pause (or resume) the tenant's Temporal Schedule, if it has one: a suspended
        tenant's schedule stops firing (and ``start_run`` refuses any run that still starts)."""
        handle = (await self.client()).get_schedule_handle(schedule_id(tenant_id))
        try:
            if paused:
                await handle.pause(note=note)
            else:
                await handle.unpause(note=note)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise

    async def maybe_auto_start(self, sessionmaker: Any, tenant_id: str) -> None:
        """Start a run when ``auto_train_after`` feedback items arrived since the last run.

        Called after feedback is stored, off the request path; checks at most every few
        seconds per tenant and process, so a burst of feedback costs one query.
        """
        now = time.monotonic()
        if self.address is None or now - self._checked.get(tenant_id, 0.0) < AUTO_CHECK_EVERY_S:
            return
        self._checked[tenant_id] = now
        async with sessionmaker() as session:
            tenant = await session.get(Tenant, tenant_id)
            policy = policy_of(tenant.policy) if tenant is not None else None
            if policy is None or policy.auto_train_after is None:
                return
            last = await session.scalar(
                select(func.max(TrainingRun.created_at)).where(TrainingRun.tenant_id == tenant_id)
            )
            query = (
                select(func.count()).select_from(Feedback).where(Feedback.tenant_id == tenant_id)
            )
            if last is not None:
                query = query.where(Feedback.created_at > last)
            fresh = int(await session.scalar(query) or 0)
            if fresh >= policy.auto_train_after:
                try:
                    run, started = await self.start_run(
                        session, tenant_id=tenant_id, trigger="feedback"
                    )
                except (BillingSuspended, BudgetExceeded) as exc:
                    log.info("auto-start for %s refused: %s", tenant_id, exc.message)
                    return
                except (Unavailable, RPCError) as exc:
                    log.warning("auto-start for %s failed: %s", tenant_id, exc)
                    return
                if started:
                    log.info(
                        "started run %s for %s after %d new feedback items",
                        run.id,
                        tenant_id,
                        fresh,
                    )

    async def handle(self, run: TrainingRun) -> WorkflowHandle[object, object]:
        client = await self.client()
        return client.get_workflow_handle(run.workflow_id or personalize_workflow_id(run.tenant_id))

    async def cancel(self, run: TrainingRun) -> None:
        handle = await self.handle(run)
        try:
            await handle.cancel()
        except RPCError as exc:  # already finished: nothing to cancel
            if "not found" not in exc.message.lower() and "completed" not in exc.message.lower():
                raise

    async def deployment_changed(self, session: AsyncSession, *, tenant_id: str) -> None:
        """An admin changed the tenant's deployment by hand: its run watching a canary (if one
        is) looks now, and ends as the admin decided. A workflow already ended is no error."""
        run = await runs.active_run(session, tenant_id=tenant_id)
        if run is None or (run.progress or {}).get("waiting_for") != CANARY:
            return
        handle = await self.handle(run)
        try:
            await handle.signal(DEPLOYMENT_CHANGED_SIGNAL)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise

    async def decide(
        self,
        session: AsyncSession,
        *,
        run: TrainingRun,
        approve: bool,
        by: str,
        reason: str | None = None,
    ) -> None:
        """Answer a run waiting for approval (approve: promote its candidate; reject: keep the
        candidate ``rejected`` with ``reason``). ``by`` says who, for the run's log.

        The workflow records the answer through its own activities; the run is marked answered
        here at once too, so a second answer (from any API process) is refused with 409.
        """
        reason = (reason or "").strip() or None
        if reason is not None and len(reason) > MAX_DECISION_REASON:
            raise InvalidInput(
                f"the reason is {len(reason)} characters long; at most {MAX_DECISION_REASON}",
                code="reason_too_long",
            )
        # Row-locked on PostgreSQL until the commit below, so two answers cannot both pass
        # (on SQLite they might: the workflow still counts only the first).
        await session.refresh(run, with_for_update=True)
        if not awaiting_approval(run):
            progress = run.progress or {}
            state = (
                f"it was already {progress['decision']} by {progress.get('decided_by')}"
                if progress.get("decision") and run.status in runs.ACTIVE
                else f"it is {run.status.value}"
            )
            raise Conflict(
                f"run {run.id} is not waiting for approval ({state}); only a run whose "
                "candidate passed the gate under a policy with require_approval waits for one",
                code="not_awaiting_approval",
                details={"status": run.status.value, "decision": progress.get("decision")},
            )
        handle = await self.handle(run)
        try:
            await handle.signal(
                APPROVE_SIGNAL if approve else REJECT_SIGNAL, Decision(by=by, reason=reason)
            )
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:  # the workflow ended meanwhile
                raise Conflict(
                    f"run {run.id} is no longer waiting for approval: its workflow has ended",
                    code="not_awaiting_approval",
                ) from exc
            raise Unavailable(f"Temporal refused the answer: {exc.message}") from exc
        progress = {k: v for k, v in (run.progress or {}).items() if not k.startswith("waiting_")}
        run.progress = {
            **progress,
            "decision": "approved" if approve else "rejected",
            "decided_by": by,
        }
        await session.commit()


async def save_policy(
    request: Request, session: AsyncSession, *, tenant_id: str, policy: TrainingPolicy
) -> None:
    """Store a tenant's policy (API and dashboard): its Temporal Schedule follows, and this
    process's inference gate forgets the old one at once (others within the memo's ttl)."""
    orch: Orchestrator = request.app.state.orchestrator
    await runs.save_policy(
        session, tenant_id=tenant_id, policy=policy, sync_schedule=orch.sync_schedule
    )
    gate: InferenceGate = request.app.state.inference_gate
    gate.forget(tenant_id)
