"""The ``PersonalizeTenant`` workflow: compile → train → evaluate → gate → register → promote →
meter, one run per tenant at a time (the workflow id is ``personalize/<tenant>``).

Deterministic only: no I/O, clocks or randomness here; everything else is an activity.
Business outcomes (not enough data, gate rejected, approval timed out) end the run cleanly with
a reason; infrastructure failures are retried by Temporal, and only exhausted retries fail it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import fields, replace
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from trainer.evaluation import EvalReport
    from trainer.gate import GatePolicy, gate
    from workflows.activities import (
        BAD_TRAINING_INPUT,
        BILLING_REFUSED,
        CANARY_REFUSED,
        NOT_ENOUGH_DATA,
        RUN_IN_PROGRESS,
        PersonalizationActivities,
    )
    from workflows.contracts import (
        APPROVAL,
        APPROVE_SIGNAL,
        CANARY,
        CPU_QUEUE,
        DEPLOYMENT_CHANGED_SIGNAL,
        GPU_QUEUE,
        PERSONALIZE_WORKFLOW,
        REJECT_SIGNAL,
        STATE_QUERY,
        CanaryInput,
        CanaryVerdict,
        CompileInput,
        Decision,
        EvaluateInput,
        PersonalizeInput,
        PersonalizeResult,
        PromoteInput,
        RegisterInput,
        RejectInput,
        RunOptions,
        RunState,
        RunUpdate,
        StartRunInput,
        TrainInput,
        UsageInput,
    )

A = PersonalizationActivities
JUDGMENT_GATE = "judgment-gate"
"""Patch id: runs from this version on are gated by the judge, capability and intervals."""
QUICK = timedelta(minutes=2)
MAX_CANARY_LOOKS = 800
ROLLOUT_CANARY = "canary"
"""``RunOptions.rollout`` that puts a candidate the gate passed in a live canary."""
GRPO_JUDGE_GATE = "grpo-judge-gate"
"""Patch id: runs from this version on hold a candidate trained to please the judge (GRPO) to
the held-out thumbs (``EvalReport.judge_was_reward``)."""
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# A compile that keeps failing fails the same way on the next try (its input is the tenant's
# data): a few attempts, then the run fails and says why, instead of retrying forever.
COMPILE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=4,
)
# What a run's ``progress`` says while it waits for an admin; every end of a run clears it.
NOT_WAITING: dict[str, Any] = {"waiting_for": None, "waiting_until": None}


@workflow.defn(name=PERSONALIZE_WORKFLOW)
class PersonalizeTenant:
    def __init__(self) -> None:
        self._state: RunState | None = None
        self._deployment_changed = False

    @workflow.query(name=STATE_QUERY)
    def state(self) -> RunState | None:
        return self._state

    @workflow.signal(name=APPROVE_SIGNAL)
    def approve(self, decision: Decision) -> None:
        self._answer(decision, approved=True)

    @workflow.signal(name=REJECT_SIGNAL)
    def reject(self, decision: Decision) -> None:
        self._answer(decision, approved=False)

    @workflow.signal(name=DEPLOYMENT_CHANGED_SIGNAL)
    def deployment_changed(self) -> None:
        """An admin changed the deployment by hand: a canary being watched is looked at now."""
        self._deployment_changed = True

    def _answer(self, decision: Decision, *, approved: bool) -> None:
        """The first answer to a waiting run counts; an early, late or second one is ignored."""
        s = self._state
        if s is None or s.stage != "awaiting_approval" or s.approved_by or s.rejected_by:
            workflow.logger.warning(
                "ignored %s by %s: the run is not waiting for approval",
                "approval" if approved else "rejection",
                decision.by,
            )
            return
        if approved:
            s.approved_by = decision.by or "admin"
        else:
            s.rejected_by, s.rejection_reason = decision.by or "admin", decision.reason

    @workflow.run
    async def run(self, inp: PersonalizeInput) -> PersonalizeResult:
        try:
            run_id = await self._start(inp)
        except ActivityError as err:
            if _is(err, RUN_IN_PROGRESS) or _is(err, BILLING_REFUSED):
                assert isinstance(err.cause, ApplicationError)
                return PersonalizeResult(str(err.cause.details[0]), "skipped", _cause(err))
            raise
        self._state = RunState(run_id=run_id)
        try:
            return await self._run(inp, run_id)
        except (asyncio.CancelledError, CancelledError):
            # Record the outcome (activities still run after a cancel request), then let the
            # cancellation stand so Temporal shows the workflow as cancelled.
            await self._finish(inp, run_id, "cancelled", "cancelled by request")
            raise
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):  # the activity stopped for the cancel
                await self._finish(inp, run_id, "cancelled", "cancelled by request")
                raise
            return await self._finish(inp, run_id, "failed", _cause(err), level="error")

    async def _start(self, inp: PersonalizeInput) -> str:
        run_id: str = await workflow.execute_activity_method(
            A.start_run,
            StartRunInput(
                inp.tenant_id,
                inp.run_id,
                inp.trigger,
                workflow.info().workflow_id,
                inp.options.method,
            ),
            task_queue=CPU_QUEUE,
            start_to_close_timeout=QUICK,
            retry_policy=RETRY,
        )
        return run_id

    async def _run(self, inp: PersonalizeInput, run_id: str) -> PersonalizeResult:
        o, tenant = inp.options, inp.tenant_id
        assert self._state is not None
        self._state.stage = "compiling"
        try:
            compiled = await workflow.execute_activity_method(
                A.compile_dataset,
                CompileInput(tenant, run_id, o.min_feedback),
                task_queue=CPU_QUEUE,
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=COMPILE_RETRY,
            )
        except ActivityError as err:
            if _is(err, NOT_ENOUGH_DATA):
                return await self._finish(inp, run_id, "skipped", _cause(err))
            raise
        await self._update(
            RunUpdate(
                tenant,
                run_id,
                dataset_id=compiled.dataset_id,
                message="dataset compiled",
                data=compiled.counts,
            )
        )

        self._state.stage = "training"
        try:
            trained = await workflow.execute_activity_method(
                A.train_adapter,
                TrainInput(tenant, run_id, compiled.dataset_dir, o),
                task_queue=GPU_QUEUE,
                start_to_close_timeout=timedelta(hours=12),
                heartbeat_timeout=timedelta(seconds=o.heartbeat_timeout_s),
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5),
            )
        except ActivityError as err:
            if _is(err, NOT_ENOUGH_DATA):
                return await self._finish(inp, run_id, "skipped", _cause(err))
            if _is(err, BAD_TRAINING_INPUT):
                return await self._finish(inp, run_id, "failed", _cause(err), level="error")
            raise
        await self._update(
            RunUpdate(
                tenant,
                run_id,
                method=trained.method,
                message=f"trained {trained.method} adapter in {trained.steps} steps"
                + (f" ({trained.method_reason})" if trained.method_reason else ""),
                data={
                    "steps": trained.steps,
                    "runtime_s": trained.runtime_s,
                    "cpu_s": trained.cpu_s,
                    "resumed_from_step": trained.resumed_from_step,
                    "method": trained.method,
                    "method_reason": trained.method_reason,
                    "tokens": trained.tokens,
                },
            )
        )

        self._state.stage = "evaluating"
        current = await self._activity(A.current_adapter, tenant)
        evaluated = await workflow.execute_activity_method(
            A.evaluate_adapter,
            EvaluateInput(
                tenant,
                run_id,
                compiled.dataset_dir,
                trained.adapter_dir,
                o,
                *(current or [None, None]),
            ),
            task_queue=GPU_QUEUE,
            start_to_close_timeout=timedelta(hours=2),
            heartbeat_timeout=timedelta(seconds=max(o.heartbeat_timeout_s, 600)),
            retry_policy=RETRY,
        )
        policy = GatePolicy(**{f.name: getattr(o, f.name) for f in fields(GatePolicy)})
        if not workflow.patched(JUDGMENT_GATE):
            # A run started before the judgment gate decides on the checks it had then: its
            # options carry no capability bound (the dataclass default would add one).
            policy = replace(policy, max_capability_drop=None)
        report = EvalReport.from_dict(evaluated.report)
        if not workflow.patched(GRPO_JUDGE_GATE):
            # A run that was gated before the rule (replayed mid-approval, say) keeps its
            # decision.
            report.judge_was_reward = False
        decision = gate(report, policy)

        self._state.stage = "registering"
        registered = await workflow.execute_activity_method(
            A.register_adapter,
            RegisterInput(
                tenant,
                run_id,
                trained.adapter_dir,
                o.base_model,
                evaluated.report,
                decision.promote,
                decision.reason,
            ),
            task_queue=CPU_QUEUE,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RETRY,
        )
        self._state.version_id = registered.version_id
        await self._activity(A.record_training_usage, UsageInput(tenant, run_id, trained.tokens))
        await self._activity(A.cleanup_run, tenant, run_id)
        if not decision.promote:
            return await self._finish(
                inp,
                run_id,
                "succeeded",
                f"not promoted: {decision.reason}",
                version_id=registered.version_id,
            )

        approved = ""
        if o.require_approval:
            refused = await self._await_approval(tenant, run_id, registered.version_id, o)
            if refused is not None:
                return await self._finish(
                    inp, run_id, "succeeded", refused, version_id=registered.version_id
                )
            approved = f" (approved by {self._state.approved_by})"

        if o.rollout == ROLLOUT_CANARY:
            return await self._canary(
                inp, run_id, registered.version_id, o, f"{decision.reason}{approved}"
            )
        self._state.stage = "promoting"
        await self._activity(A.promote_adapter, PromoteInput(tenant, run_id, registered.version_id))
        return await self._finish(
            inp,
            run_id,
            "succeeded",
            f"promoted{approved}: {decision.reason}",
            version_id=registered.version_id,
            promoted=True,
        )

    async def _canary(
        self, inp: PersonalizeInput, run_id: str, version_id: str, o: RunOptions, gated: str
    ) -> PersonalizeResult:
        """The candidate the gate passed answers a share of end users beside the live version
        until their thumbs decide (``core.canary``), its time runs out, or an admin decides.
        Timers and activities only: a worker or server restart resumes the wait."""
        state, tenant = self._state, inp.tenant_id
        assert state is not None
        state.stage = "canary"
        look = CanaryInput(
            tenant,
            run_id,
            version_id,
            fraction=o.canary_fraction,
            min_thumbs=o.canary_min_thumbs,
        )
        try:
            verdict = await self._watch_canary(look, o, gated)
        except (asyncio.CancelledError, CancelledError, ActivityError) as err:
            if isinstance(err, ActivityError) and _is(err, CANARY_REFUSED):
                return await self._finish(
                    inp, run_id, "succeeded", f"not promoted: {_cause(err)}", version_id=version_id
                )
            cancelled = not isinstance(err, ActivityError) or isinstance(err.cause, CancelledError)
            if cancelled:
                # The run's cancel ends its canary too (if it began): the live version goes on
                # answering everyone.
                await self._activity(A.look_at_canary, replace(look, abort="the run was cancelled"))
            raise
        if verdict.promoted:
            return await self._finish(
                inp,
                run_id,
                "succeeded",
                f"promoted after a canary: {verdict.reason} (the gate: {gated})",
                version_id=version_id,
                promoted=True,
            )
        outcome = {"rollback": "rolled back", "expire": "expired"}.get(verdict.action, "ended")
        return await self._finish(
            inp,
            run_id,
            "succeeded",
            f"not promoted: the canary {outcome}: {verdict.reason}",
            version_id=version_id,
        )

    async def _watch_canary(self, look: CanaryInput, o: RunOptions, gated: str) -> CanaryVerdict:
        """Start the canary and look at it until it is decided (each look writes the arms into
        the run's progress itself, so a look costs one timer and one activity)."""
        await workflow.execute_activity_method(
            A.start_canary,
            look,
            task_queue=CPU_QUEUE,
            start_to_close_timeout=QUICK,
            retry_policy=RETRY,
            # A cancel waits for the start to finish, so the abort that follows finds the
            # canary it must end instead of racing the start.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        until = workflow.now() + timedelta(hours=o.canary_max_hours)
        # At most about 800 looks however long the canary runs (a look adds about a dozen
        # events): the history stays under Temporal's 10,240-event warning. 72 hours: a look
        # every 5.4 minutes.
        poll = max(o.canary_poll_s, o.canary_max_hours * 3600 / MAX_CANARY_LOOKS)
        waiting: dict[str, Any] = {"waiting_for": CANARY, "waiting_until": until.isoformat()}
        await self._update(
            RunUpdate(
                look.tenant_id,
                look.run_id,
                version_id=look.version_id,
                message=(
                    f"the gate passed ({gated}); canary: version {look.version_id} answers "
                    f"{o.canary_fraction:.0%} of end users until {until:%Y-%m-%d %H:%M} UTC, "
                    "promoted when their thumbs show it better, rolled back when they show it "
                    "worse or its answers slow down (GET /v1/deployment; POST "
                    "/v1/deployment/canary/promote or /abort decides now)"
                ),
                data={**waiting, "version_id": look.version_id},
                progress=waiting,
            )
        )
        while True:
            left = (until - workflow.now()).total_seconds()
            if left > 0:
                if workflow.patched("canary-look-on-signal"):
                    # Woken early by an admin's change (its decision shows in the run at once).
                    with contextlib.suppress(TimeoutError):
                        await workflow.wait_condition(
                            lambda: self._deployment_changed, timeout=min(poll, left)
                        )
                    self._deployment_changed = False
                else:  # a run started before this change replays as it ran
                    await workflow.sleep(min(poll, left))
            verdict: CanaryVerdict = await self._activity(
                A.look_at_canary, replace(look, expired=workflow.now() >= until)
            )
            if verdict.action != "wait":
                return verdict
            look = replace(look, looks_done=verdict.looks_done)

    async def _await_approval(
        self, tenant: str, run_id: str, version_id: str, o: RunOptions
    ) -> str | None:
        """Wait for an admin's approve or reject signal. None: approved; else why the candidate
        is not promoted (rejected, with the version marked so, or no answer in time)."""
        state = self._state
        assert state is not None
        state.stage = "awaiting_approval"
        timeout = timedelta(hours=o.approval_timeout_hours)
        until = workflow.now() + timeout
        waiting = {"waiting_for": APPROVAL, "waiting_until": until.isoformat()}
        await self._update(
            RunUpdate(
                tenant,
                run_id,
                version_id=version_id,
                message=(
                    f"waiting until {until:%Y-%m-%d %H:%M} UTC for an admin to approve or reject "
                    f"promotion of version {version_id}: POST /v1/runs/{run_id}/approve or "
                    f"POST /v1/runs/{run_id}/reject, the run's dashboard page, or "
                    f"`tuneloop runs approve|reject {run_id}`; without an answer it is not promoted"
                ),
                data={**waiting, "version_id": version_id},
                progress=waiting,
            )
        )
        try:
            await workflow.wait_condition(
                lambda: state.approved_by is not None or state.rejected_by is not None,
                timeout=timeout,
            )
        except TimeoutError:
            return "not promoted: approval timed out"
        if state.rejected_by is None:
            await self._update(
                RunUpdate(
                    tenant,
                    run_id,
                    message=f"promotion approved by {state.approved_by}",
                    progress={
                        **NOT_WAITING,
                        "decision": "approved",
                        "decided_by": state.approved_by,
                    },
                )
            )
            return None
        why = f"rejected by {state.rejected_by}"
        if state.rejection_reason:
            why += f": {state.rejection_reason}"
        state.stage = "rejecting"
        await self._update(
            RunUpdate(
                tenant,
                run_id,
                message=f"promotion {why}",
                progress={**NOT_WAITING, "decision": "rejected", "decided_by": state.rejected_by},
            )
        )
        await self._activity(A.reject_version, RejectInput(tenant, run_id, version_id, why))
        return f"not promoted: {why}"

    async def _activity(self, fn: Any, *args: Any) -> Any:
        return await workflow.execute_activity_method(
            fn,
            args=list(args),
            task_queue=CPU_QUEUE,
            start_to_close_timeout=QUICK,
            retry_policy=RETRY,
        )

    async def _update(self, upd: RunUpdate) -> None:
        await self._activity(A.update_run, upd)

    async def _finish(
        self,
        inp: PersonalizeInput,
        run_id: str,
        status: str,
        reason: str,
        *,
        version_id: str | None = None,
        promoted: bool = False,
        level: str = "info",
    ) -> PersonalizeResult:
        if self._state is not None:
            self._state.stage, self._state.reason = status, reason
        await self._update(
            RunUpdate(
                inp.tenant_id,
                run_id,
                status=status,
                reason=reason,
                version_id=version_id,
                level=level,
                message=f"run {status}: {reason}",
                progress=NOT_WAITING,
            )
        )
        return PersonalizeResult(run_id, status, reason, version_id, promoted)


def _is(err: ActivityError, kind: str) -> bool:
    return isinstance(err.cause, ApplicationError) and err.cause.type == kind


def _cause(err: BaseException) -> str:
    """The innermost message: what actually went wrong, for the run's reason."""
    cause: BaseException | None = err
    while getattr(cause, "cause", None) is not None:
        cause = getattr(cause, "cause", None)
    return str(cause or err)
