"""The personalization loop end to end on the real dev server and the tiny model."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import select

from core.db import create_sessionmaker
from core.models import UsageRecord
from tests.conftest import Backend
from tests.workflows.conftest import setup_tenant, wait_for_run

pytestmark = pytest.mark.usefixtures("worker")


async def test_feedback_becomes_a_promoted_served_adapter(
    loop_client: httpx.AsyncClient,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t)
    r = await loop_client.post("/v1/runs", headers=t.auth("admin"), json={})
    assert r.status_code == 202, r.text
    run = await wait_for_run(loop_client, t, r.json()["id"])
    assert run["status"] == "succeeded", run
    assert run["reason"].startswith("promoted") and run["adapter_version_id"]
    assert run["progress"]["step"] == run["progress"]["total_steps"] == 4

    versions = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    assert [(v["id"], v["status"], v["live"]) for v in versions] == [
        (run["adapter_version_id"], "promoted", True)
    ]
    assert versions[0]["eval_report"]["n_regression_prompts"] > 0

    answer = await loop_client.post(
        "/v1/chat/completions",
        headers=t.auth(),
        json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert answer.json()["served_by"] == run["adapter_version_id"]

    events = (
        await loop_client.get(f"/v1/runs/{run['id']}/events", headers=t.auth("admin"))
    ).json()["data"]
    messages = [e["message"] for e in events]
    assert messages[0] == "run started" and "dataset compiled" in messages
    assert any(e["type"] == "metrics" for e in events)
    assert messages[-1].startswith("run succeeded")
    async with create_sessionmaker(backend.engine)() as s:
        usage = list(
            await s.scalars(
                select(UsageRecord).where(
                    UsageRecord.tenant_id == t.id, UsageRecord.meter == "training_tokens"
                )
            )
        )
    assert len(usage) == 1 and usage[0].quantity > 0


async def test_too_little_feedback_skips_with_a_reason(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t, feedback=2)
    r = await loop_client.post("/v1/runs", headers=t.auth("admin"))
    run = await wait_for_run(loop_client, t, r.json()["id"])
    assert run["status"] == "skipped" and "feedback" in run["reason"].lower(), run
    versions = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    assert versions == []


async def test_gate_rejection_keeps_the_version_with_its_report(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t, min_pref_improvement=1.0)  # cannot be met
    r = await loop_client.post("/v1/runs", headers=t.auth("admin"))
    run = await wait_for_run(loop_client, t, r.json()["id"])
    assert run["status"] == "succeeded" and run["reason"].startswith("not promoted"), run
    versions = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    assert len(versions) == 1 and versions[0]["status"] == "rejected"
    assert versions[0]["reason"] and versions[0]["eval_report"] and not versions[0]["live"]


async def test_one_run_per_tenant_many_tenants_in_parallel(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await make_tenant(), await make_tenant()
    for t in (a, b):
        await setup_tenant(loop_client, t)
    first = await loop_client.post("/v1/runs", headers=a.auth("admin"))
    second = await loop_client.post("/v1/runs", headers=a.auth("admin"))
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    other = await loop_client.post("/v1/runs", headers=b.auth("admin"))
    assert other.status_code == 202
    runs = await asyncio.gather(
        wait_for_run(loop_client, a, first.json()["id"]),
        wait_for_run(loop_client, b, other.json()["id"]),
    )
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    listed = (await loop_client.get("/v1/runs", headers=a.auth("admin"))).json()["data"]
    assert [r["id"] for r in listed] == [first.json()["id"]]
    # b's key cannot see a's run.
    r = await loop_client.get(f"/v1/runs/{first.json()['id']}", headers=b.auth("admin"))
    assert r.status_code == 404


async def test_cancel_mid_training(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    await setup_tenant(loop_client, t, max_steps=5000)
    run_id = (await loop_client.post("/v1/runs", headers=t.auth("admin"))).json()["id"]
    for _ in range(240):
        run = (await loop_client.get(f"/v1/runs/{run_id}", headers=t.auth("admin"))).json()
        if run["progress"].get("step", 0) >= 2:
            break
        await asyncio.sleep(0.5)
    r = await loop_client.post(f"/v1/runs/{run_id}/cancel", headers=t.auth("admin"))
    assert r.status_code == 202
    run = await wait_for_run(loop_client, t, run_id, timeout=120)
    assert run["status"] == "cancelled", run
    assert run["progress"]["step"] < 5000
