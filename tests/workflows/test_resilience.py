"""Crashes during a run: a worker killed by pid, and the Temporal server restarted on the same
database file. Workers run as real ``tuneloop worker`` processes against a dev server of this
module's own, so the session's in-process worker cannot pick the work up instead."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select
from temporalio.client import Client

from core.db import create_sessionmaker
from core.ids import new_id
from core.models import AdapterVersion, RunEvent, TrainingRun
from tests.conftest import TUNELOOP, Backend, free_port, tuneloop_env
from tests.workflows.conftest import setup_tenant
from tests.workflows.test_canary_rollout import answer_users, rate
from tests.workflows.test_judgment import logs
from workflows.contracts import (
    CPU_QUEUE,
    PERSONALIZE_WORKFLOW,
    PersonalizeInput,
    PersonalizeResult,
    RunOptions,
    personalize_workflow_id,
)
from workflows.devserver import start_dev_server, stop

OPTIONS = RunOptions(
    base_model="tiny-random",
    max_steps=400,
    rank=4,
    batch_size=2,
    checkpoint_every=5,
    # Generous: a loaded CI machine can take many seconds to set up training before the first
    # heartbeat; the cost is a longer wait after the kill.
    heartbeat_timeout_s=30,
    min_pref_improvement=None,
    min_win_rate=None,
    max_capability_drop=None,
    max_regression_kl=None,
    max_ppl_increase=None,
    eval_max_new_tokens=4,
)


@pytest.fixture
def sqlite_only(backend: Backend) -> None:
    if backend.name != "sqlite":
        pytest.skip("the crash scenarios run once per session, on the SQLite backend")


class Stack:
    """A dev server on its own database file, and ``tuneloop worker`` processes."""

    def __init__(self, backend: Backend, tmp: Path) -> None:
        self.backend, self.tmp = backend, tmp
        self.port = free_port()
        self.db_file = tmp / "temporal.db"
        self.server = start_dev_server(port=self.port, ui_port=None, db_file=self.db_file)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart_server(self) -> None:
        self.server.send_signal(signal.SIGKILL)
        self.server.wait()
        self.server = start_dev_server(port=self.port, ui_port=None, db_file=self.db_file)

    def start_worker(self) -> subprocess.Popen[bytes]:
        env = tuneloop_env(self.backend.settings.data_dir, self.backend.url)
        env["TEMPORAL_ADDRESS"] = self.address
        log = (self.tmp / f"worker-{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [TUNELOOP, "worker", "--queue", "all"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.workers.append(proc)
        return proc

    def close(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.terminate()
                try:
                    w.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    w.kill()
        stop(self.server)


@pytest.fixture
def stack(backend: Backend, tmp_path: Path, sqlite_only: None) -> Iterator[Stack]:
    s = Stack(backend, tmp_path)
    yield s
    s.close()


async def _step(backend: Backend, run_id: str) -> int:
    async with create_sessionmaker(backend.engine)() as s:
        run = await s.get(TrainingRun, run_id)
        return int((run.progress or {}).get("step", 0)) if run else 0


async def _start(stack: Stack, tenant_id: str, options: RunOptions = OPTIONS) -> tuple[Client, str]:
    client = await Client.connect(stack.address)
    run_id = new_id("run")
    await client.start_workflow(
        PERSONALIZE_WORKFLOW,
        PersonalizeInput(tenant_id=tenant_id, run_id=run_id, trigger="test", options=options),
        id=personalize_workflow_id(tenant_id),
        task_queue=CPU_QUEUE,
    )
    return client, run_id


async def _wait_for_step(backend: Backend, run_id: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while await _step(backend, run_id) < step:
        assert time.monotonic() < deadline, f"training did not reach step {step}"
        await asyncio.sleep(0.3)


async def _versions(backend: Backend, tenant_id: str) -> int:
    async with create_sessionmaker(backend.engine)() as s:
        n = await s.scalar(
            select(func.count())
            .select_from(AdapterVersion)
            .where(AdapterVersion.tenant_id == tenant_id)
        )
    return int(n or 0)


async def test_killed_worker_resumes_from_its_checkpoint(
    stack: Stack,
    client,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(client, t)
    first = stack.start_worker()
    tclient, run_id = await _start(stack, t.id)
    await _wait_for_step(backend, run_id, 12)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = await _step(backend, run_id)
    stack.start_worker()
    handle = tclient.get_workflow_handle(
        personalize_workflow_id(t.id), result_type=PersonalizeResult
    )
    result = await handle.result()
    assert result.status == "succeeded" and result.promoted, result
    events = [e async for e in handle.fetch_history_events()]
    train_attempts = [
        e
        for e in events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.attempt > 1
    ]
    assert train_attempts, "the train activity should have been retried on the new worker"
    async with create_sessionmaker(backend.engine)() as s:
        run = await s.get(TrainingRun, run_id)
    assert run is not None and run.progress["step"] == 400
    assert await _versions(backend, t.id) == 1
    trained = next(
        e
        for e in events
        if e.HasField("activity_task_completed_event_attributes")
        and b"resumed_from_step"
        in e.activity_task_completed_event_attributes.result.payloads[0].data
    )
    payload = trained.activity_task_completed_event_attributes.result.payloads[0].data
    import json

    resumed = json.loads(payload)["resumed_from_step"]
    # From a checkpoint written before the kill (the progress row lags by up to 2 s), not from 0.
    assert 0 < resumed < 400 and resumed % OPTIONS.checkpoint_every == 0, (resumed, killed_at)


async def test_a_killed_grpo_worker_resumes_with_the_judge_it_fitted(
    stack: Stack,
    client,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    """Killed mid-training (every GRPO step generates and scores its groups first): the retry
    reuses the judge the first attempt fitted (it is not fitted again) and continues from the
    last checkpoint."""
    t = await make_tenant()
    r = await client.post("/v1/feedback", headers=t.auth(), json={"items": logs(seed=3)})
    assert r.status_code == 201, r.text
    first = stack.start_worker()
    tclient = await Client.connect(stack.address)
    run_id = new_id("run")
    options = replace(OPTIONS, method="grpo", max_steps=60)
    await tclient.start_workflow(
        PERSONALIZE_WORKFLOW,
        PersonalizeInput(tenant_id=t.id, run_id=run_id, trigger="test", options=options),
        id=personalize_workflow_id(t.id),
        task_queue=CPU_QUEUE,
    )
    await _wait_for_step(backend, run_id, 12)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    judge = backend.settings.data_dir / "runs" / t.id / run_id / "train" / "judge.json"
    fitted = judge.read_bytes(), judge.stat().st_mtime_ns
    stack.start_worker()
    handle = tclient.get_workflow_handle(
        personalize_workflow_id(t.id), result_type=PersonalizeResult
    )
    result = await handle.result()
    assert result.status == "succeeded", result
    assert (judge.read_bytes(), judge.stat().st_mtime_ns) == fitted  # reused, not refitted
    async with create_sessionmaker(backend.engine)() as s:
        trained = await s.scalar(
            select(RunEvent).where(
                RunEvent.run_id == run_id, RunEvent.message.startswith("trained")
            )
        )
    assert trained is not None and trained.data["method"] == "grpo", trained
    assert trained.data["method_reason"].startswith("GRPO, as asked, rewarded by the tenant's")
    assert 0 < trained.data["resumed_from_step"] < 60
    assert trained.data["tokens"] > 0


async def test_run_survives_a_temporal_server_restart(
    stack: Stack,
    client,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(client, t)
    stack.start_worker()
    _, run_id = await _start(stack, t.id)
    await _wait_for_step(backend, run_id, 8)
    stack.restart_server()
    tclient = await Client.connect(stack.address)
    handle = tclient.get_workflow_handle(
        personalize_workflow_id(t.id), result_type=PersonalizeResult
    )
    result = await handle.result()
    assert result.status == "succeeded" and result.promoted, result
    assert await _versions(backend, t.id) == 1


async def test_a_canary_survives_a_killed_worker_and_a_server_restart(
    stack: Stack,
    client,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(client, t)
    first = stack.start_worker()
    canary = replace(
        OPTIONS,
        max_steps=4,
        rollout="canary",
        canary_fraction=0.5,
        canary_min_thumbs=5,
        canary_max_hours=0.2,
        canary_poll_s=0.5,
    )
    _, run_id = await _start(stack, t.id, canary)
    deadline = time.monotonic() + 300
    while True:
        async with create_sessionmaker(backend.engine)() as s:
            run = await s.get(TrainingRun, run_id)
            if run is not None and (run.progress or {}).get("waiting_for") == "canary":
                version = run.adapter_version_id
                break
        assert time.monotonic() < deadline, "no canary after 300 s"
        await asyncio.sleep(0.3)
    # Mid-canary: the worker dies and the server restarts; a new worker picks the wait up.
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    stack.restart_server()
    stack.start_worker()
    # Meanwhile the API serves the split and takes the thumbs (it needs neither).
    answered = await answer_users(client, t)
    assert set(answered) == {version, "base"}, answered
    await rate(client, t, answered[version], "up")
    await rate(client, t, answered["base"], "down")
    handle = (await Client.connect(stack.address)).get_workflow_handle(
        personalize_workflow_id(t.id), result_type=PersonalizeResult
    )
    result = await asyncio.wait_for(handle.result(), timeout=240)
    assert result.status == "succeeded" and result.promoted, result
    assert result.reason is not None and result.reason.startswith("promoted after a canary: P(")
