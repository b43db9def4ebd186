"""The API's handle on Temporal: a lazily connected client, and starting/cancelling runs.

Only ``workflows.contracts`` is imported from the workflow layer, so the API process never loads
the worker's stack (torch, TRL) to start a run.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from core.errors import NotFound, Unavailable
from core.models import RunStatus, Tenant, TrainingRun
from core.policy import TrainingPolicy, policy_of
from workflows.contracts import (
    CPU_QUEUE,
    PERSONALIZE_WORKFLOW,
    PersonalizeInput,
    RunOptions,
    personalize_workflow_id,
)

ACTIVE = (RunStatus.queued, RunStatus.running)


class Orchestrator:
    def __init__(self, address: str | None, *, base_model: str) -> None:
        self.address = address
        self.base_model = base_model
        self._client: Client | None = None
        self._lock = asyncio.Lock()

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
                    raise Unavailable(
                        f"cannot reach Temporal at {self.address}: {exc}",
                        code="orchestration_unavailable",
                    ) from exc
        return self._client

    def options(self, policy: TrainingPolicy, method: str | None = None) -> RunOptions:
        return RunOptions(
            base_model=self.base_model,
            method=method or policy.method,
            min_feedback=policy.min_feedback,
            max_steps=policy.max_steps,
            epochs=policy.epochs,
            rank=policy.rank,
            min_pref_improvement=policy.min_pref_improvement,
            min_win_rate=policy.min_win_rate,
            max_regression_kl=policy.max_regression_kl,
            max_ppl_increase=policy.max_ppl_increase,
            require_approval=policy.require_approval,
            approval_timeout_s=policy.approval_timeout_hours * 3600,
        )

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
        client = await self.client()
        tenant = await session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id!r}")
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
            running = await session.scalar(
                select(TrainingRun)
                .where(TrainingRun.tenant_id == tenant_id, TrainingRun.status.in_(ACTIVE))
                .order_by(TrainingRun.id.desc())
                .limit(1)
            )
            if running is None:
                raise Unavailable("a run for this tenant is starting; retry in a moment") from None
            return running, False
        except RPCError as exc:
            run.status, run.reason = RunStatus.failed, f"could not start: {exc.message}"
            await session.commit()
            raise Unavailable(f"Temporal refused the run: {exc.message}") from exc
        return run, True

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

    @staticmethod
    def describe(options: RunOptions) -> dict[str, object]:
        return asdict(options)
