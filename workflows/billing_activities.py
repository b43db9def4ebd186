"""The usage reporter's activity and its schedule: ledger rows go to Stripe as meter events.

Built only where Stripe is configured (``STRIPE_API_KEY``); the Stripe client is injected, which
is also how the tests point it at their fake Stripe.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from core.stripe_billing import StripeBilling, StripeMisconfigured
from workflows.contracts import (
    CPU_QUEUE,
    REPORT_USAGE_SCHEDULE_ID,
    REPORT_USAGE_WORKFLOW,
    REPORT_USAGE_WORKFLOW_ID,
    ReportBatchInput,
    ReportBatchOutput,
    ReportUsageInput,
)

log = logging.getLogger(__name__)

STRIPE_UNAVAILABLE = "StripeUnavailable"
STRIPE_MISCONFIGURED = "StripeMisconfigured"


class BillingActivities:
    def __init__(
        self, *, sessionmaker: async_sessionmaker[AsyncSession], stripe: StripeBilling
    ) -> None:
        self.sessionmaker = sessionmaker
        self.stripe = stripe

    @activity.defn
    async def report_usage_batch(self, inp: ReportBatchInput) -> ReportBatchOutput:
        """Send one page of unreported ledger rows; accepted rows are marked reported before
        this returns, so a retry resends only what Stripe may not have (and Stripe dedupes
        those by identifier). Stripe unreachable or busy for the whole batch: a retryable
        failure, after marking what went through, so Temporal backs off and tries again; for
        some rows only: returned as ``retryable``, so the rows behind them go on. A refused API
        key: a non-retryable failure (``StripeMisconfigured``) until the operator fixes it."""
        async with self.sessionmaker() as session:
            try:
                outcome = await self.stripe.report(session, limit=inp.limit, after=inp.after)
            except StripeMisconfigured as exc:
                raise ApplicationError(
                    f"Stripe refused the API key (check STRIPE_API_KEY and its permissions): {exc}",
                    type=STRIPE_MISCONFIGURED,
                    non_retryable=True,
                ) from None
        if outcome.retryable is not None and outcome.sent == 0:
            raise ApplicationError(
                f"Stripe did not take any meter event: {outcome.retryable}",
                type=STRIPE_UNAVAILABLE,
            )
        if outcome.pending:
            log.warning("%d usage rows left unreported for now", outcome.pending)
        return ReportBatchOutput(outcome.sent, outcome.pending, outcome.last_id, outcome.retryable)


async def ensure_report_schedule(
    client: Client, *, every: timedelta, task_queue: str = CPU_QUEUE
) -> None:
    """Create (or update) the Schedule that runs ``ReportUsage`` every ``every``. Overlapping
    firings are skipped: one reporter at a time, and a slow pass is never doubled."""
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            REPORT_USAGE_WORKFLOW,
            ReportUsageInput(),
            id=REPORT_USAGE_WORKFLOW_ID,
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(REPORT_USAGE_SCHEDULE_ID, schedule)
    except ScheduleAlreadyRunningError:
        handle = client.get_schedule_handle(REPORT_USAGE_SCHEDULE_ID)
        await handle.update(lambda _: ScheduleUpdate(schedule=schedule))


async def remove_report_schedule(client: Client) -> None:
    """Delete the reporter's Schedule if there is one: a worker without Stripe registers no
    ``ReportUsage``, so a schedule left from when Stripe was configured would start workflows
    that nothing runs."""
    try:
        await client.get_schedule_handle(REPORT_USAGE_SCHEDULE_ID).delete()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
    else:
        log.info("Stripe is not configured: the usage-reporting schedule is removed")
