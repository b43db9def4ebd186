"""The ``ReportUsage`` workflow: page through the unreported usage ledger and send it to Stripe
as meter events (one activity call per page). Started by a Temporal Schedule; deterministic
only. Stripe being down is retried with exponential backoff by Temporal; a pass that cannot
finish within its timeout fails and the next firing starts over from the ledger, which is what
remembers what was sent."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.billing_activities import BillingActivities
    from workflows.contracts import (
        REPORT_USAGE_WORKFLOW,
        ReportBatchInput,
        ReportUsageInput,
        ReportUsageResult,
    )

RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)


@workflow.defn(name=REPORT_USAGE_WORKFLOW)
class ReportUsage:
    @workflow.run
    async def run(self, inp: ReportUsageInput) -> ReportUsageResult:
        sent = pending = batches = 0
        after: str | None = None
        retryable: str | None = None
        while batches < inp.max_batches:
            # No task queue given: the activity runs where this workflow runs (the cpu queue).
            out = await workflow.execute_activity_method(
                BillingActivities.report_usage_batch,
                ReportBatchInput(limit=inp.batch_size, after=after),
                start_to_close_timeout=timedelta(minutes=5),
                schedule_to_close_timeout=timedelta(hours=1),
                retry_policy=RETRY,
            )
            batches += 1
            sent, pending = sent + out.sent, pending + out.pending
            retryable = retryable or out.retryable
            if out.last_id is None or out.sent + out.pending < inp.batch_size:
                break
            after = out.last_id
        if retryable is not None:
            # Every batch was tried; the schedule's next firing resends what Stripe did not take.
            raise ApplicationError(
                f"{sent} usage rows sent; Stripe did not take some others: {retryable}",
                type="StripeUnavailable",
            )
        return ReportUsageResult(sent=sent, batches=batches, pending=pending)
