"""Activities of the personalization loop: the only place where the workflow touches the
database, the artifact store and torch. Methods of a class built with its clients, so tests and
workers inject them (temporalio samples: hello_activity_method)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

import trainer
from core import deployments, runs
from core.artifacts import ArtifactStore
from core.billing import BillingConfig
from core.canary import CanaryRule, Verdict, decide
from core.errors import BillingSuspended, BudgetExceeded, Conflict, NotFound, TenantSuspended
from core.ids import new_id
from core.models import (
    AdapterStatus,
    AdapterVersion,
    Dataset,
    Deployment,
    Feedback,
    Interaction,
    RunStatus,
    TrainingRun,
)
from core.usage import TRAINING_TOKENS, record_usage
from serving import registry
from serving.gateway import AdapterPlacement
from serving.types import ServingBackend
from workflows.contracts import (
    CanaryInput,
    CanaryVerdict,
    CompileInput,
    CompileOutput,
    EvaluateInput,
    EvaluateOutput,
    PromoteInput,
    RegisterInput,
    RegisterOutput,
    RejectInput,
    RunUpdate,
    StartRunInput,
    TrainInput,
    TrainOutput,
    UsageInput,
)

log = logging.getLogger(__name__)

UNRATED_EVAL_PROMPTS = 256
"""Most unrated questions an evaluation reads (it judges at most ``max_win_prompts`` of all)."""
MAX_EVAL_PROMPT = 16_384
"""Characters of an unrated conversation beyond which it is no evaluation question."""
MAX_COMPILE_RECORDS = 100_000
MAX_COMPILE_BYTES = 256 * 2**20
"""Most feedback rows and characters one compile reads, newest first; the data card counts the
rest as ``records_left_out``."""

# Business outcomes the workflow turns into a clean end of the run; retrying cannot help.
NOT_ENOUGH_DATA = "NotEnoughData"
BAD_TRAINING_INPUT = "BadTrainingInput"
RUN_IN_PROGRESS = "RunInProgress"
BILLING_REFUSED = "BillingRefused"
"""The run may not start (runs a schedule fired): the operator suspended the tenant, its
subscription lapsed, or the run would pass its budget. (The name predates suspension; recorded
histories carry it.)"""
CANARY_REFUSED = "CanaryRefused"
"""The candidate cannot start its canary: another one (started by an admin) is running, or the
candidate is already live (promoted by hand meanwhile)."""


_CONCLUDED = {
    "promote": "promoted by its canary",
    "rollback": "rolled back by its canary",
    "expire": "its canary expired",
}
"""A version's reason after its canary, by ``core.canary.Verdict.action``."""


async def _apply_update(session: AsyncSession, upd: RunUpdate) -> None:
    """``upd`` applied to its run (uncommitted)."""
    try:
        await runs.update(session, **asdict(upd))
    except NotFound as exc:
        raise ApplicationError(exc.message, non_retryable=True) from None


def _business_error(exc: trainer.TrainerError, kind: str) -> ApplicationError:
    return ApplicationError(str(exc), type=kind, non_retryable=True)


class PersonalizationActivities:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: ArtifactStore,
        data_dir: Path,
        progress_every_s: float = 2.0,
        billing: BillingConfig | None = None,
        serving: ServingBackend | None = None,
    ) -> None:
        """Build inside the worker's event loop: training threads report progress through it.

        ``serving``: the serving tier this worker can reach (the vLLM pool, or the API's local
        engine when both run in one process), so that a promotion preloads its version and a
        rejected canary is unloaded. Without one only the deployment pointers move, and the
        gateway loads and unloads on the next request."""
        self.sessionmaker = sessionmaker
        self.billing = billing or BillingConfig()
        self.store = store
        self.data_dir = data_dir
        self.progress_every_s = progress_every_s
        self.placement = AdapterPlacement(serving, store)
        self._loop = asyncio.get_running_loop()

    def run_dir(self, tenant_id: str, run_id: str) -> Path:
        return self.data_dir / "runs" / tenant_id / run_id

    # --- run bookkeeping --------------------------------------------------------------------

    @activity.defn
    async def start_run(self, inp: StartRunInput) -> str:
        """Mark the run running (creating its row for scheduled runs); returns the run id.

        Scheduled runs have workflow ids of their own, so the database is where one run per
        tenant is enforced: a run that finds another one in flight ends skipped.
        """
        async with self.sessionmaker() as session:
            run = await session.get(TrainingRun, inp.run_id) if inp.run_id else None
            if run is None:
                run = TrainingRun(
                    id=inp.run_id or new_id("run"),
                    tenant_id=inp.tenant_id,
                    trigger=inp.trigger,
                    method=inp.method,
                    workflow_id=inp.workflow_id,
                )
                session.add(run)
                await session.flush()
            if run.status is RunStatus.queued:
                # Scheduled runs reach no API check (where a suspended tenant's keys are
                # refused): the slot, suspension and billing are enforced here for every run.
                try:
                    await runs.begin(session, run, trigger=inp.trigger, billing=self.billing)
                except runs.AnotherRunActive as exc:
                    raise ApplicationError(
                        exc.message, run.id, type=RUN_IN_PROGRESS, non_retryable=True
                    ) from None
                except (TenantSuspended, BillingSuspended, BudgetExceeded) as exc:
                    raise ApplicationError(
                        exc.message, run.id, type=BILLING_REFUSED, non_retryable=True
                    ) from None
            await session.commit()
            return run.id

    @activity.defn
    async def update_run(self, upd: RunUpdate) -> None:
        async with self.sessionmaker() as session:
            await _apply_update(session, upd)
            await session.commit()

    async def _record_progress(self, tenant_id: str, run_id: str, p: trainer.TrainProgress) -> None:
        data = {
            **p.metrics,  # first: TRL's own "step" is a float, ours is the integer
            "step": p.step,
            "total_steps": p.total_steps,
            "loss": p.loss,
            "eta_s": p.eta_s,
            "elapsed_s": round(p.elapsed_s, 1),
        }
        async with self.sessionmaker() as session:
            await runs.record_progress(
                session, run_id=run_id, progress=data, message=f"step {p.step}/{p.total_steps}"
            )
            await session.commit()

    # --- 1. compile ---------------------------------------------------------------------------

    @activity.defn
    async def compile_dataset(self, inp: CompileInput) -> CompileOutput:
        """The tenant's feedback (joined with the interactions it rates) → JSONL datasets."""
        records: list[trainer.FeedbackRecord] = []
        budget, left_out = MAX_COMPILE_BYTES, 0
        async with self.sessionmaker() as session:
            # Newest first, streamed, within a row and a byte budget: one tenant's flood of
            # feedback cannot hold a worker's memory, and what is left out is the oldest.
            rows = await session.stream(
                select(Feedback, Interaction)
                .outerjoin(Interaction, Interaction.id == Feedback.interaction_id)
                .where(Feedback.tenant_id == inp.tenant_id)
                .order_by(Feedback.id.desc())
                .execution_options(yield_per=500)
            )
            async for fb, it in rows:
                record = _record(fb, it)
                if record is None:
                    continue
                size = (
                    _size(record.messages) + len(record.completion) + len(record.correction or "")
                )
                if len(records) >= MAX_COMPILE_RECORDS or size > budget:
                    left_out += 1
                    continue
                budget -= size
                records.append(record)
            records.reverse()  # back to the order they came in: a later correction wins
            # The newest answers nobody rated: evaluation-only questions for the judge's win
            # rate (at half the answers rated, they double the questions it can be read on).
            rated = select(Feedback.id).where(Feedback.interaction_id == Interaction.id)
            unrated = (
                await session.scalars(
                    select(Interaction.messages)
                    .where(Interaction.tenant_id == inp.tenant_id, ~rated.exists())
                    .order_by(Interaction.id.desc())
                    .limit(UNRATED_EVAL_PROMPTS)
                )
            ).all()
        questions = [c for c in map(_conversation, unrated) if c and _size(c) <= MAX_EVAL_PROMPT]
        try:
            # Off the event loop: scrubbing and hashing megabytes is CPU work, and this worker's
            # loop also runs every other tenant's activities.
            compiled = await asyncio.to_thread(
                trainer.compile_feedback,
                records,
                min_records=inp.min_feedback,
                unrated=questions,
                max_eval_prompts=UNRATED_EVAL_PROMPTS,
            )
        except (trainer.NotEnoughData, trainer.OneSidedFeedback) as exc:
            raise _business_error(exc, NOT_ENOUGH_DATA) from exc
        if left_out:
            compiled = replace(compiled, card=replace(compiled.card, records_left_out=left_out))
        out = self.run_dir(inp.tenant_id, inp.run_id) / "dataset"
        await asyncio.to_thread(trainer.write_jsonl, compiled, out)
        card = compiled.card.to_dict()
        async with self.sessionmaker() as session:
            dataset = Dataset(
                tenant_id=inp.tenant_id,
                run_id=inp.run_id,
                content_hash=card.get("content_hash", ""),
                counts={k: v for k, v in card.items() if isinstance(v, int)},
                data_card=card,
                uri=str(out),
            )
            session.add(dataset)
            await session.commit()
        return CompileOutput(dataset_id=dataset.id, dataset_dir=str(out), counts=dataset.counts)

    # --- 2. train -----------------------------------------------------------------------------

    @activity.defn
    def train_adapter(self, inp: TrainInput) -> TrainOutput:
        """Train with heartbeats ``{step, checkpoint}``; a retried attempt resumes from the last
        checkpoint. Runs in the worker's thread pool (torch releases the GIL)."""
        o = inp.options
        # Every training setting reaches the spec by field name (RunOptions mirrors TrainSpec).
        shared = {
            f.name: getattr(o, f.name) for f in fields(trainer.TrainSpec) if hasattr(o, f.name)
        }
        spec = trainer.TrainSpec(
            **shared,
            data=Path(inp.dataset_dir),
            output_dir=self.run_dir(inp.tenant_id, inp.run_id) / "train",
            data_dir=self.data_dir,
            resume=True,
        )
        last_report = 0.0

        def progress(p: trainer.TrainProgress) -> bool:
            nonlocal last_report
            activity.heartbeat({"step": p.step, "checkpoint": p.checkpoint})
            now = time.monotonic()
            if now - last_report >= self.progress_every_s or p.step == p.total_steps:
                last_report = now
                asyncio.run_coroutine_threadsafe(
                    self._record_progress(inp.tenant_id, inp.run_id, p), self._loop
                )
            return not activity.is_cancelled()  # False: checkpoint and stop

        def phase(name: str, done: int, total: int) -> bool:
            # Between optimizer steps: fitting the judge, GRPO's generation (a heartbeat per
            # scored group), so a long phase is not taken for a lost worker.
            activity.heartbeat({"phase": name, "done": done, "total": total})
            return not activity.is_cancelled()

        activity.heartbeat({"step": 0, "checkpoint": None})
        try:
            result = trainer.train(spec, progress=progress, phase=phase)
        except trainer.TrainingCancelled:
            raise  # the SDK reports it as the cancellation it is
        except trainer.NotEnoughData as exc:  # e.g. a train split with one kind of vote only
            raise _business_error(exc, NOT_ENOUGH_DATA) from exc
        except (trainer.InvalidSpec, trainer.TrainingDiverged, trainer.CorruptAdapter) as exc:
            raise _business_error(exc, BAD_TRAINING_INPUT) from exc
        return TrainOutput(
            adapter_dir=str(result.adapter_dir),
            sha256=result.weights_sha256,
            method=result.method,
            steps=result.steps,
            examples=result.num_examples,
            # GRPO counts what it generated and what its judge read; the offline methods, the
            # rows they trained on.
            tokens=int(result.metrics["tokens"])
            if "tokens" in result.metrics
            else _training_tokens(inp.dataset_dir, result.method, result.steps * o.batch_size),
            # The trainer's own word on where it continued (``checkpoints/checkpoint-<step>``).
            resumed_from_step=int(str(result.metrics.get("resumed_from") or "-0").rsplit("-")[-1]),
            runtime_s=result.train_runtime_s,
            method_reason=str(result.metrics.get("method_reason", "")),
            cpu_s=float(result.metrics.get("cpu_s") or 0.0),
        )

    # --- 3. evaluate --------------------------------------------------------------------------

    @activity.defn
    async def current_adapter(self, tenant_id: str) -> list[str]:
        """``[version_id, adapter_dir]`` of the live version, or ``[]`` when base is served."""
        async with self.sessionmaker() as session:
            resolved = await registry.resolve_model(
                session, self.store, tenant_id=tenant_id, model=registry.DEFAULT
            )
        if resolved.version is None or resolved.adapter is None:
            return []
        return [resolved.version.id, str(resolved.adapter.path)]

    @activity.defn
    def evaluate_adapter(self, inp: EvaluateInput) -> EvaluateOutput:
        """Judge, win rate, tenant metric, capability guard and drift; heartbeats per phase."""
        activity.heartbeat("loading")
        try:
            report = trainer.evaluate(
                base_model=inp.options.base_model,
                candidate=Path(inp.adapter_dir),
                data=Path(inp.dataset_dir),
                data_dir=self.data_dir,
                current=Path(inp.current_adapter_dir) if inp.current_adapter_dir else None,
                min_judge_auroc=inp.options.min_judge_auroc,
                # Where training saved the judge it fitted (GRPO, or auto weighing GRPO): the
                # evaluation reads it instead of fitting the same judge again.
                judge_out=self.run_dir(inp.tenant_id, inp.run_id) / "train",
                max_new_tokens=inp.options.eval_max_new_tokens,
                # A check the tenant turned off is not measured: each costs minutes of generation.
                win_rate=inp.options.min_win_rate is not None,
                capability=inp.options.max_capability_drop is not None,
                current_label=inp.current_version_id or "base",
                seed=inp.options.seed,
                progress=activity.heartbeat,
            )
        except trainer.CorruptAdapter as exc:
            raise _business_error(exc, BAD_TRAINING_INPUT) from exc
        return EvaluateOutput(report=report.to_dict(), current_version_id=inp.current_version_id)

    # --- 4/5. register and promote ------------------------------------------------------------

    @activity.defn
    async def register_adapter(self, inp: RegisterInput) -> RegisterOutput:
        """Publish the adapter to the store as a version (idempotent by weights) and check that
        the stored copy loads; a rejected candidate is kept with its report and reason."""
        try:
            trainer.verify_adapter(Path(inp.adapter_dir))
        except trainer.CorruptAdapter as exc:
            raise _business_error(exc, BAD_TRAINING_INPUT) from exc
        async with self.sessionmaker() as session:
            version = await registry.register_adapter(
                session,
                self.store,
                tenant_id=inp.tenant_id,
                adapter_dir=Path(inp.adapter_dir),
                base_model=inp.base_model,
                run_id=inp.run_id,
                eval_report=inp.report,
            )
            trainer.verify_adapter(self.store.path(version.uri), expected_sha256=version.sha256)
            if not inp.accepted and version.status is AdapterStatus.candidate:
                version.status = AdapterStatus.rejected
                version.reason = inp.reason
                await session.commit()
            return RegisterOutput(version_id=version.id, serving_name=version.serving_name)

    @activity.defn
    async def promote_adapter(self, inp: PromoteInput) -> None:
        async with self.sessionmaker() as session:
            await self.placement.promote(
                session, tenant_id=inp.tenant_id, version_id=inp.version_id
            )

    @activity.defn
    async def start_canary(self, inp: CanaryInput) -> None:
        """Let the candidate answer ``fraction`` of end users beside the live version
        (idempotent: a retry finds its own canary running)."""
        async with self.sessionmaker() as session:
            deployment = await session.get(Deployment, inp.tenant_id)
            if deployment is not None and deployment.canary_version_id == inp.version_id:
                return
            try:
                await self.placement.start_canary(
                    session,
                    tenant_id=inp.tenant_id,
                    version_id=inp.version_id,
                    fraction=inp.fraction,
                )
            except Conflict as exc:  # another canary (started by hand): the run says so
                raise ApplicationError(str(exc), type=CANARY_REFUSED, non_retryable=True) from exc

    @activity.defn
    async def look_at_canary(self, inp: CanaryInput) -> CanaryVerdict:
        """Run the decision rule (``core.canary.decide``) on the arms' thumbs and latency, and
        carry out a decision: promote, or end the canary with the current version staying
        (``inp.abort`` ends it whatever the thumbs say). The arms go into the run's progress
        here, in the same transaction (not by another activity: a look's events are what bound
        how long a canary's history may grow). A canary no longer running (an admin promoted or
        aborted it, or promoted another version, or this activity's earlier attempt decided) is
        ``ended``."""
        async with self.sessionmaker() as session:
            canary = await deployments.current_canary(
                session, tenant_id=inp.tenant_id, latency=True
            )
            if canary is None or canary.version_id != inp.version_id:
                return await self._canary_ended(session, inp)
            arms = (("current", canary.current), ("candidate", canary.candidate))
            progress = {
                "canary": {
                    arm: {"up": a.up, "down": a.down, "requests": a.requests, "p95_ms": a.p95_ms}
                    for arm, a in arms
                },
                "p_better": canary.p_better,
            }
            if inp.abort is not None:
                verdict = Verdict("rollback", inp.abort, canary.p_better, inp.looks_done)
            else:
                verdict = decide(
                    canary.current,
                    canary.candidate,
                    CanaryRule(min_thumbs=inp.min_thumbs),
                    looks_done=inp.looks_done,
                    expired=inp.expired,
                )
            looked = verdict.action == "wait" and verdict.looks_done > inp.looks_done
            await _apply_update(
                session,
                RunUpdate(
                    inp.tenant_id,
                    inp.run_id,
                    message=f"canary look {verdict.looks_done}: {verdict.reason}" if looked else "",
                    progress=progress,
                ),
            )
            if verdict.action == "wait":
                await session.commit()
            else:
                await self.placement.conclude_canary(  # commits the progress too
                    session,
                    tenant_id=inp.tenant_id,
                    promote=verdict.action == "promote",
                    reason=inp.abort or f"{_CONCLUDED[verdict.action]}: {verdict.reason}",
                    version_id=inp.version_id,
                )
            return CanaryVerdict(
                verdict.action,
                verdict.reason,
                verdict.looks_done,
                promoted=verdict.action == "promote",
            )

    async def _canary_ended(self, session: AsyncSession, inp: CanaryInput) -> CanaryVerdict:
        version = await deployments.get_version(
            session, tenant_id=inp.tenant_id, version_id=inp.version_id
        )
        promoted = version.status is AdapterStatus.promoted
        if promoted:
            reason = version.reason or "promoted by hand"
        elif version.status is AdapterStatus.candidate:
            # Another version was promoted, or the live one rolled back, by hand: that ended
            # the canary before its users decided, and the run does not promote this one (nor
            # does a cancelled run whose canary never began).
            version.status = AdapterStatus.rejected
            version.reason = reason = inp.abort or (
                "its canary ended when the live version was changed by hand, before its users' "
                "thumbs decided"
            )
            await session.commit()
        else:
            reason = version.reason or "the canary was ended"
        return CanaryVerdict("ended", reason, inp.looks_done, promoted=promoted)

    @activity.defn
    async def reject_version(self, inp: RejectInput) -> None:
        """An admin turned the candidate down: it is kept, ``rejected``, with their reason (a
        version promoted by hand meanwhile stays as it is)."""
        async with self.sessionmaker() as session:
            version = await session.get(AdapterVersion, inp.version_id)
            if version is None or version.tenant_id != inp.tenant_id:
                raise ApplicationError(f"no version {inp.version_id}", non_retryable=True)
            if version.status is AdapterStatus.candidate:
                version.status = AdapterStatus.rejected
                version.reason = inp.reason
                await session.commit()

    # --- 6. meter -----------------------------------------------------------------------------

    @activity.defn
    async def record_training_usage(self, inp: UsageInput) -> None:
        async with self.sessionmaker() as session:
            await record_usage(
                session,
                tenant_id=inp.tenant_id,
                meter=TRAINING_TOKENS,
                quantity=inp.tokens,
                idempotency_key=f"training:{inp.run_id}",
            )
            await session.commit()

    @activity.defn
    def cleanup_run(self, tenant_id: str, run_id: str) -> None:
        """Drop checkpoints once the adapter is in the store; the dataset stays (data card)."""
        shutil.rmtree(self.run_dir(tenant_id, run_id) / "train" / "checkpoints", ignore_errors=True)


def _size(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def _conversation(messages: Any) -> list[dict[str, str]]:
    """A stored conversation as plain role/content strings; empty when it is not one."""
    if not isinstance(messages, list):
        return []
    out = [
        {"role": m["role"], "content": m["content"]}
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("role"), str)
    ]
    if len(out) != len(messages) or not all(isinstance(m["content"], str) for m in out):
        return []
    return out


def _record(fb: Feedback, interaction: Interaction | None) -> trainer.FeedbackRecord | None:
    """A feedback row as the trainer's record; rows it cannot use are left out."""
    completion: str | None
    if interaction is not None:
        messages, completion = interaction.messages, interaction.completion
    elif fb.messages is not None:
        messages, completion = fb.messages, fb.completion
    else:
        messages = [{"role": "user", "content": fb.prompt or ""}]
        completion = fb.completion
    try:
        return trainer.FeedbackRecord(
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            completion=completion or "",
            rating=fb.rating,
            correction=fb.correction,
            user_id=fb.user_id,
            created_at=fb.created_at,
            interaction_id=fb.interaction_id,
            score=fb.score,
        )
    except trainer.InvalidFeedback:
        return None


def _training_tokens(dataset_dir: str, method: str, examples_seen: int) -> int:
    """Tokens trained on, for metering: the mean whitespace-token count of a training row
    times the rows the optimizer saw (tokenizer-independent, so meters agree across bases)."""
    rows_file = Path(dataset_dir) / f"{method}_train.jsonl"
    if not rows_file.is_file():
        return 0
    sizes = [len(line.split()) for line in rows_file.read_text().splitlines() if line.strip()]
    return int(sum(sizes) / len(sizes) * examples_seen) if sizes else 0
