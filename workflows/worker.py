"""Worker entry point: polls the ``cpu`` and/or ``gpu`` task queues until told to stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from core.artifacts import ArtifactStore
from core.billing import BillingConfig
from core.db import create_engine, create_sessionmaker
from core.settings import Settings
from core.stripe_billing import StripeBilling
from serving.backends import build_backend
from serving.types import ServingBackend
from trainer.base_models import ML_IMPORT_LOCK
from workflows.activities import PersonalizationActivities
from workflows.billing import ReportUsage
from workflows.billing_activities import (
    BillingActivities,
    ensure_report_schedule,
    remove_report_schedule,
)
from workflows.contracts import CPU_QUEUE, GPU_QUEUE
from workflows.personalize import PersonalizeTenant

log = logging.getLogger(__name__)

QUEUES = {"cpu": (CPU_QUEUE,), "gpu": (GPU_QUEUE,), "all": (CPU_QUEUE, GPU_QUEUE)}


def import_ml_stack() -> None:
    """Import the ML libraries once, in one thread, before any activity runs.

    Their first import is not thread-safe (torch pulls in sympy lazily; two threads importing it
    at once can leave ``sympy`` half-initialized, seen as "module 'sympy' has no attribute
    'printing'" in every later attempt). Activities run in several threads, so the worker pays
    the import cost up front instead.
    """
    with ML_IMPORT_LOCK:  # and not beside a model load in another thread of this process
        import peft  # noqa: F401
        import safetensors.torch  # noqa: F401
        import sympy  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401


def build_workers(
    client: Client,
    activities: PersonalizationActivities,
    queues: Iterable[str],
    billing: BillingActivities | None = None,
) -> list[Worker]:
    workers = []
    a = activities
    # The usage reporter runs only where Stripe is configured.
    billing_workflows: list[type] = [] if billing is None else [ReportUsage]
    billing_activities: list[Any] = [] if billing is None else [billing.report_usage_batch]
    # Running activities get this long to finish on shutdown; training checkpoints and stops
    # when cancelled, so a retried attempt on another worker resumes from there.
    grace = timedelta(seconds=30)
    if CPU_QUEUE in queues:
        workers.append(
            Worker(
                client,
                task_queue=CPU_QUEUE,
                workflows=[PersonalizeTenant, *billing_workflows],
                activities=[
                    *billing_activities,
                    a.start_run,
                    a.update_run,
                    a.compile_dataset,
                    a.current_adapter,
                    a.register_adapter,
                    a.promote_adapter,
                    a.start_canary,
                    a.look_at_canary,
                    a.reject_version,
                    a.record_training_usage,
                    a.cleanup_run,
                ],
                activity_executor=ThreadPoolExecutor(max_workers=2),
                graceful_shutdown_timeout=grace,
            )
        )
    if GPU_QUEUE in queues:
        # One accelerator, one job: training and evaluation never share it.
        workers.append(
            Worker(
                client,
                task_queue=GPU_QUEUE,
                activities=[a.train_adapter, a.evaluate_adapter],
                activity_executor=ThreadPoolExecutor(max_workers=1),
                max_concurrent_activities=1,
                graceful_shutdown_timeout=grace,
            )
        )
    return workers


async def run_worker(
    settings: Settings,
    *,
    queue: str,
    stop: asyncio.Event,
    client: Client | None = None,
    serving: ServingBackend | None = None,
) -> None:
    """Run until ``stop`` is set, then shut down gracefully.

    ``serving``: the serving tier promotions preload on. The embedded stack passes its API's
    local engine; otherwise a worker on a vLLM pool reaches the replicas itself, and a worker in
    another process than a local engine has none (the gateway loads on the next request)."""
    if client is None:
        if not settings.temporal_address:
            raise RuntimeError(
                "TEMPORAL_ADDRESS is not set: point it at a Temporal frontend, "
                "or use `tuneloop up`, which starts a dev server"
            )
        client = await Client.connect(settings.temporal_address)
    await asyncio.to_thread(import_ml_stack)  # one thread, before any activity can start
    engine = create_engine(settings)
    sessionmaker = create_sessionmaker(engine)
    own_serving = serving is None and settings.serving_backend == "vllm"
    if own_serving:
        serving = build_backend(settings)
    activities = PersonalizationActivities(
        sessionmaker=sessionmaker,
        store=ArtifactStore(settings.data_dir / "artifacts"),
        data_dir=settings.data_dir,
        billing=BillingConfig.from_settings(settings),
        serving=serving,
    )
    stripe_billing = StripeBilling.from_settings(settings)
    billing = (
        BillingActivities(sessionmaker=sessionmaker, stripe=stripe_billing)
        if stripe_billing is not None
        else None
    )
    try:
        async with AsyncExitStack() as stack:
            for worker in build_workers(client, activities, QUEUES[queue], billing):
                await stack.enter_async_context(worker)
            if billing is not None and CPU_QUEUE in QUEUES[queue]:
                every = timedelta(seconds=settings.billing_report_every_s)
                await ensure_report_schedule(client, every=every)
                log.info("usage goes to Stripe every %s", every)
            elif CPU_QUEUE in QUEUES[queue]:
                await remove_report_schedule(client)
            log.info("worker polling %s", ", ".join(QUEUES[queue]))
            await stop.wait()
            log.info("worker stopping")
    finally:
        if stripe_billing is not None:
            await stripe_billing.close()
        if own_serving and serving is not None:
            await serving.close()
        await engine.dispose()
