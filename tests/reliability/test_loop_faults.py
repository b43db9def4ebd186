"""Faults in the personalization loop that tests/workflows and tests/serving do not cover.

The adapter a run trained is gone when the cpu worker comes to register it — the gpu worker's
run directory on a node-local disk that was wiped, or a data volume that is not really shared
between the two workers. The run must fail with a reason that says so, register nothing, and
leave serving alone: the tenant keeps its promoted version, other tenants are untouched.

The fault is the file system's: the real activities run on a real Temporal dev server, with
``register_adapter`` deleting the trained adapter directory just before doing its real work.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from temporalio import activity
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from serving import registry
from tests.conftest import Backend, TenantKeys
from tests.serving.adapters import make_adapter
from tests.workflows.conftest import address, setup_tenant, wait_for_run
from workflows.activities import PersonalizationActivities
from workflows.contracts import RegisterInput, RegisterOutput
from workflows.devserver import temporal_binary
from workflows.worker import QUEUES, build_workers, import_ml_stack

pytestmark = pytest.mark.reliability


class ArtifactGoneAtRegistration(PersonalizationActivities):
    """The real activities; the trained adapter's directory vanishes before registration."""

    @activity.defn(name="register_adapter")
    async def register_adapter(self, inp: RegisterInput) -> RegisterOutput:
        shutil.rmtree(inp.adapter_dir)
        return await super().register_adapter(inp)


@pytest.fixture
async def faulty_loop(backend: Backend) -> AsyncIterator[httpx.AsyncClient]:
    """A dev server of its own (so no other worker takes the work), a worker with the fault,
    and the API wired to both."""
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    settings = backend.settings.model_copy(update={"temporal_address": address(env)})
    await asyncio.to_thread(import_ml_stack)
    activities = ArtifactGoneAtRegistration(
        sessionmaker=create_sessionmaker(backend.engine),
        store=ArtifactStore(settings.data_dir / "artifacts"),
        data_dir=settings.data_dir,
    )
    app = create_app(settings, engine=backend.engine)
    try:
        async with AsyncExitStack() as stack:
            for worker in build_workers(env.client, activities, QUEUES["all"]):
                await stack.enter_async_context(worker)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test", timeout=60
            ) as http:
                yield http
    finally:
        await app.state.backend.close()
        await env.shutdown()


async def _ask(http: httpx.AsyncClient, t: TenantKeys) -> tuple[str, str]:
    r = await http.post(
        "/v1/chat/completions",
        headers=t.auth(),
        json={
            "model": "default",
            "messages": [{"role": "user", "content": "what is new?"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["served_by"], r.json()["choices"][0]["message"]["content"]


async def test_artifact_missing_at_registration_fails_the_run_not_serving(
    faulty_loop: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
) -> None:
    http = faulty_loop
    t, other = await make_tenant(), await make_tenant()
    store = ArtifactStore(backend.settings.data_dir / "artifacts")
    live: dict[str, str] = {}
    for n, tenant in enumerate((t, other)):
        adapter = make_adapter(backend.settings.data_dir, tmp_path / f"a{n}", seed=40 + n)
        async with create_sessionmaker(backend.engine)() as s:
            version = await registry.register_adapter(
                s, store, tenant_id=tenant.id, adapter_dir=adapter, base_model="tiny-random"
            )
        r = await http.post(f"/v1/adapters/{version.id}/promote", headers=tenant.auth("admin"))
        assert r.status_code == 200, r.text
        live[tenant.id] = version.id
    before = {x.id: await _ask(http, x) for x in (t, other)}
    assert before[t.id][0] == live[t.id] and before[other.id][0] == live[other.id]

    await setup_tenant(http, t)
    r = await http.post("/v1/runs", headers=t.auth("admin"), json={})
    assert r.status_code == 202, r.text
    run = await wait_for_run(http, t, r.json()["id"])

    assert run["status"] == "failed", run
    assert "missing" in run["reason"] and "re-run training" in run["reason"], run["reason"]
    assert run["adapter_version_id"] is None
    events = (await http.get(f"/v1/runs/{run['id']}/events", headers=t.auth("admin"))).json()
    last = events["data"][-1]
    assert last["level"] == "error" and last["message"] == f"run failed: {run['reason']}"
    # Nothing was registered; what was live stays live and answers the same.
    versions = (await http.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    assert [(v["id"], v["status"], v["live"]) for v in versions] == [(live[t.id], "promoted", True)]
    after = {x.id: await _ask(http, x) for x in (t, other)}
    assert after == before
