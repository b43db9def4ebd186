"""Record the event history of a real ``PersonalizeTenant`` run for the replay test.

Run on purpose after an intended change to the workflow's command sequence (then review the
diff of the JSON):  .venv/bin/python -m tests.workflows.record_history
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

import migrations
from core.db import create_engine, create_sessionmaker
from core.feedback import NewFeedback, ingest_feedback
from core.settings import Settings
from core.tenants import create_tenant
from tests.workflows.conftest import thumbs
from tests.workflows.test_resilience import OPTIONS
from workflows.contracts import (
    CPU_QUEUE,
    PERSONALIZE_WORKFLOW,
    PersonalizeInput,
    personalize_workflow_id,
)
from workflows.devserver import temporal_binary
from workflows.worker import run_worker

OUT = Path(__file__).parent / "histories"


async def main() -> None:
    data_dir = Path(tempfile.mkdtemp())
    settings = Settings(data_dir=data_dir)
    engine = create_engine(settings)
    await migrations.upgrade(engine)
    async with create_sessionmaker(engine)() as s:
        tenant = (await create_tenant(s, slug="history")).tenant
        items = [
            NewFeedback(
                rating=1 if i["rating"] == "up" else -1,
                prompt=i["prompt"],
                completion=i["completion"],
            )
            for i in thumbs()
        ]
        await ingest_feedback(s, tenant_id=tenant.id, items=items)
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, queue="all", stop=stop, client=env.client))
    options = OPTIONS.__class__(**{**OPTIONS.__dict__, "max_steps": 4})
    handle = await env.client.start_workflow(
        PERSONALIZE_WORKFLOW,
        PersonalizeInput(tenant_id=tenant.id, trigger="history", options=options),
        id=personalize_workflow_id(tenant.id),
        task_queue=CPU_QUEUE,
    )
    await handle.result()
    history = await handle.fetch_history()
    OUT.mkdir(exist_ok=True)
    (OUT / "personalize_promoted.json").write_text(history.to_json())
    stop.set()
    await worker
    await env.shutdown()
    await engine.dispose()
    print(f"wrote {OUT / 'personalize_promoted.json'}")


if __name__ == "__main__":
    asyncio.run(main())
