"""Orchestration overhead of the personalization loop, and many tenants through one worker.

1. The same run twice over: the trainer's functions called directly in one process (compile →
   train → evaluate → gate), and the whole ``PersonalizeTenant`` workflow on the Temporal dev
   server with one in-process worker (which also reads the feedback from the database, records
   events, registers, promotes and meters). Target: workflow / direct ≤ 1.10.
2. ``--tenants N`` runs started at once through that one worker (one training at a time, as on one
   GPU): total time and the largest queueing delay of a training activity.

    .venv/bin/python tests/bench/pipeline.py [--base tiny-random] [--steps 30] [--tenants 20]

Prints a table and writes tests/bench/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
import trainer  # noqa: E402
from core.db import create_engine, create_sessionmaker  # noqa: E402
from core.feedback import NewFeedback, ingest_feedback  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tenants import create_tenant  # noqa: E402
from workflows.contracts import (  # noqa: E402
    CPU_QUEUE,
    PERSONALIZE_WORKFLOW,
    PersonalizeInput,
    PersonalizeResult,
    RunOptions,
    personalize_workflow_id,
)
from workflows.devserver import temporal_binary  # noqa: E402
from workflows.worker import import_ml_stack, run_worker  # noqa: E402


def thumbs(n_prompts: int) -> list[NewFeedback]:
    items = []
    for i in range(n_prompts):
        prompt = f"question number {i} about topic {i * 7 % 11}?"
        items.append(NewFeedback(rating=1, prompt=prompt, completion=f"short answer {i}."))
        items.append(
            NewFeedback(
                rating=-1, prompt=prompt, completion=f"a much longer answer {i} that goes on " * 3
            )
        )
    return items


def options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        base_model=args.base,
        max_steps=args.steps,
        rank=8,
        batch_size=4,
        checkpoint_every=max(1, args.steps // 3),
        min_pref_improvement=None,
        min_win_rate=None,
        max_capability_drop=None,
        max_regression_kl=None,
        max_ppl_increase=None,
        eval_max_new_tokens=16,
        heartbeat_timeout_s=600,
    )


def direct(args: argparse.Namespace, data_dir: Path, work: Path) -> float:
    """compile → train → evaluate → gate, as plain function calls."""
    o = options(args)
    records = [
        trainer.FeedbackRecord(
            messages=[{"role": "user", "content": f.prompt or ""}],
            completion=f.completion or "",
            rating=f.rating,
        )
        for f in thumbs(args.prompts)
    ]
    started = time.perf_counter()
    compiled = trainer.compile_feedback(records, min_records=o.min_feedback)
    trainer.write_jsonl(compiled, work / "dataset")
    result = trainer.train(
        trainer.TrainSpec(
            base_model=o.base_model,
            data=work / "dataset",
            output_dir=work / "train",
            data_dir=data_dir,
            method="auto",
            rank=o.rank,
            max_steps=o.max_steps,
            batch_size=o.batch_size,
            checkpoint_every=o.checkpoint_every,
            resume=True,
        )
    )
    report = trainer.evaluate(
        base_model=o.base_model,
        candidate=result.adapter_dir,
        data=work / "dataset",
        data_dir=data_dir,
        max_new_tokens=o.eval_max_new_tokens,
    )
    trainer.gate(
        report,
        trainer.GatePolicy(
            min_pref_improvement=None,
            min_win_rate=None,
            max_capability_drop=None,
            max_regression_kl=None,
            max_ppl_increase=None,
        ),
    )
    return time.perf_counter() - started


async def tenant_with_feedback(sessionmaker: Any, slug: str, prompts: int) -> str:
    async with sessionmaker() as s:
        tenant = (await create_tenant(s, slug=slug)).tenant
        await ingest_feedback(s, tenant_id=tenant.id, items=thumbs(prompts))
    return str(tenant.id)


async def train_queue_delay(client: Any, tenant_id: str) -> float:
    """Seconds the train activity waited between scheduled and started (the queueing delay)."""
    handle = client.get_workflow_handle(personalize_workflow_id(tenant_id))
    scheduled: dict[int, float] = {}
    delay = 0.0
    async for e in handle.fetch_history_events():
        attrs = e.activity_task_scheduled_event_attributes
        if e.HasField("activity_task_scheduled_event_attributes") and (
            attrs.activity_type.name == "train_adapter"
        ):
            scheduled[e.event_id] = e.event_time.ToDatetime().timestamp()
        if e.HasField("activity_task_started_event_attributes"):
            sid = e.activity_task_started_event_attributes.scheduled_event_id
            if sid in scheduled:
                delay = e.event_time.ToDatetime().timestamp() - scheduled[sid]
    return delay


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from temporalio.testing import WorkflowEnvironment

    data_dir = Path(tempfile.mkdtemp(prefix="tuneloop-pipeline-"))
    settings = Settings(data_dir=data_dir)
    engine = create_engine(settings)
    await migrations.upgrade(engine)
    sessionmaker = create_sessionmaker(engine)
    import_ml_stack()
    trainer.resolve_base_model(args.base, data_dir=data_dir)  # materialize once, untimed
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, queue="all", stop=stop, client=env.client))

    async def workflow_once(tag: str) -> float:
        tenant_id = await tenant_with_feedback(sessionmaker, f"overhead-{tag}", args.prompts)
        started = time.perf_counter()
        handle = await env.client.start_workflow(
            PERSONALIZE_WORKFLOW,
            PersonalizeInput(tenant_id=tenant_id, options=options(args)),
            id=personalize_workflow_id(tenant_id),
            task_queue=CPU_QUEUE,
            result_type=PersonalizeResult,
        )
        result = await handle.result()
        assert result.status == "succeeded", result
        return time.perf_counter() - started

    try:
        # Warm both paths (first imports, kernels, the model files' page cache): not timed.
        await asyncio.to_thread(direct, args, data_dir, Path(tempfile.mkdtemp(dir=data_dir)))
        await workflow_once("warm-up")
        direct_s, workflow_s = [], []
        for i in range(args.repeats):  # alternate, so drift on a shared machine hits both
            direct_s.append(
                await asyncio.to_thread(
                    direct, args, data_dir, Path(tempfile.mkdtemp(dir=data_dir))
                )
            )
            workflow_s.append(await workflow_once(str(i)))
        many: dict[str, Any] = {}
        if args.tenants:
            ids = [
                await tenant_with_feedback(sessionmaker, f"many-{i}", args.prompts)
                for i in range(args.tenants)
            ]
            started = time.perf_counter()
            handles = [
                await env.client.start_workflow(
                    PERSONALIZE_WORKFLOW,
                    PersonalizeInput(tenant_id=t, options=options(args)),
                    id=personalize_workflow_id(t),
                    task_queue=CPU_QUEUE,
                    result_type=PersonalizeResult,
                )
                for t in ids
            ]
            results = await asyncio.gather(*(h.result() for h in handles))
            total = time.perf_counter() - started
            delays = [await train_queue_delay(env.client, t) for t in ids]
            many = {
                "tenants": args.tenants,
                "total_s": round(total, 1),
                "succeeded": sum(r.status == "succeeded" for r in results),
                "max_queue_delay_s": round(max(delays), 1),
                "mean_run_s": round(total / args.tenants, 2),
            }
    finally:
        stop.set()
        await worker
        await env.shutdown()
        await engine.dispose()
    d, w = statistics.median(direct_s), statistics.median(workflow_s)
    return {
        "base": args.base,
        "steps": args.steps,
        "prompts": args.prompts,
        "direct_s": [round(x, 2) for x in direct_s],
        "workflow_s": [round(x, 2) for x in workflow_s],
        "overhead_ratio": round(w / d, 3),
        "many_tenants": many,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="tiny-random")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "tests/bench/results/pipeline.json")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(f"\npipeline on {result['base']}, {result['steps']} steps, {result['prompts']} prompts")
    print(f"direct trainer calls (s):    {result['direct_s']}")
    print(f"PersonalizeTenant workflow (s): {result['workflow_s']}")
    print(f"overhead workflow/direct (median): {result['overhead_ratio']:.3f}x  (target <= 1.10)")
    if result["many_tenants"]:
        m = result["many_tenants"]
        print(
            f"{m['tenants']} tenants through one worker: {m['total_s']} s total, "
            f"{m['succeeded']} succeeded, largest queueing delay {m['max_queue_delay_s']} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
