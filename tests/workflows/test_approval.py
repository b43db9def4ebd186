"""Promotion that waits for an admin (policy ``require_approval``), answered through the API,
the dashboard and the CLI, on the real dev server and the tiny model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.db import create_sessionmaker
from core.models import RunStatus, TrainingRun
from tests.conftest import TUNELOOP, Backend, TenantKeys, dashboard_login, tuneloop_env
from tests.dashboard.conftest import csrf_of
from tests.workflows.conftest import address, setup_tenant, wait_for_run, wait_until_waiting

pytestmark = pytest.mark.usefixtures("worker")

DONE = {"approve": "approved", "reject": "rejected"}


async def waiting_run(client: httpx.AsyncClient, t: TenantKeys, *, timeout: float = 180) -> Any:
    """Start a run under a policy with ``require_approval`` and return it once it waits."""
    await setup_tenant(client, t, require_approval=True)
    r = await client.post("/v1/runs", headers=t.auth("admin"))
    assert r.status_code == 202, r.text
    return await wait_until_waiting(client, t, r.json()["id"], "approval", timeout=timeout)


async def versions(client: httpx.AsyncClient, t: TenantKeys) -> list[tuple[str, str, bool]]:
    r = await client.get("/v1/adapters", headers=t.auth("admin"))
    return [(v["id"], v["status"], v["live"]) for v in r.json()["data"]]


async def served_by(client: httpx.AsyncClient, t: TenantKeys) -> str:
    r = await client.post(
        "/v1/chat/completions",
        headers=t.auth(),
        json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["served_by"])


async def test_a_waiting_run_says_so_and_approval_promotes(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t, other = await make_tenant(), await make_tenant()
    run = await waiting_run(loop_client, t)
    run_id, version = run["id"], run["adapter_version_id"]
    assert run["status"] == "running" and version
    until = datetime.fromisoformat(run["waiting_until"])
    assert until > datetime.now(UTC) + timedelta(hours=23)  # the policy's default: 24 h
    events = (await loop_client.get(f"/v1/runs/{run_id}/events", headers=t.auth("admin"))).json()
    last = events["data"][-1]["message"]
    assert f"approve or reject promotion of version {version}" in last, last
    assert f"POST /v1/runs/{run_id}/approve" in last and f"/v1/runs/{run_id}/reject" in last
    assert "dashboard" in last and f"{until:%Y-%m-%d %H:%M} UTC" in last
    assert await versions(loop_client, t) == [(version, "candidate", False)]
    assert await served_by(loop_client, t) != version

    # Another tenant's admin gets exactly what a missing run gets; a product key may not answer.
    for action in ("approve", "reject"):
        foreign = await loop_client.post(f"/v1/runs/{run_id}/{action}", headers=other.auth("admin"))
        missing = await loop_client.post(f"/v1/runs/run_nope/{action}", headers=t.auth("admin"))
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
        product = await loop_client.post(f"/v1/runs/{run_id}/{action}", headers=t.auth())
        assert product.status_code == 403
    for body in ({"reason": "x" * 1001}, {"reason": 5}, {"why": "no"}):
        r = await loop_client.post(f"/v1/runs/{run_id}/reject", headers=t.auth("admin"), json=body)
        assert r.status_code == 422, (body, r.text)
    still = (await loop_client.get(f"/v1/runs/{run_id}", headers=t.auth("admin"))).json()
    assert still["waiting_for"] == "approval"

    r = await loop_client.post(f"/v1/runs/{run_id}/approve", headers=t.auth("admin"))
    assert r.status_code == 202, r.text
    assert r.json()["waiting_for"] is None and r.json()["waiting_until"] is None
    for action in ("approve", "reject"):  # the first answer counts
        again = await loop_client.post(f"/v1/runs/{run_id}/{action}", headers=t.auth("admin"))
        assert again.status_code == 409, again.text
        error = again.json()["error"]
        assert error["code"] == "not_awaiting_approval" and "already approved" in error["message"]

    done = await wait_for_run(loop_client, t, run_id)
    assert done["status"] == "succeeded" and done["waiting_for"] is None, done
    assert done["reason"].startswith(f"promoted (approved by admin ({t.admin_key_id}))"), done
    assert await versions(loop_client, t) == [(version, "promoted", True)]
    assert await served_by(loop_client, t) == version
    events = (await loop_client.get(f"/v1/runs/{run_id}/events", headers=t.auth("admin"))).json()
    assert f"promotion approved by admin ({t.admin_key_id})" in [
        e["message"] for e in events["data"]
    ]
    late = await loop_client.post(f"/v1/runs/{run_id}/reject", headers=t.auth("admin"))
    assert late.status_code == 409 and "it is succeeded" in late.json()["error"]["message"]


async def test_rejection_keeps_the_version_rejected_with_the_reason(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
) -> None:
    t = await make_tenant()
    # A run that never waits (here: one with no workflow behind it) cannot be answered.
    async with create_sessionmaker(backend.engine)() as s:
        idle = TrainingRun(tenant_id=t.id, status=RunStatus.running, progress={"step": 1})
        s.add(idle)
        await s.commit()
    r = await loop_client.post(f"/v1/runs/{idle.id}/approve", headers=t.auth("admin"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_awaiting_approval"
    async with create_sessionmaker(backend.engine)() as s:
        await s.delete(await s.get(TrainingRun, idle.id))
        await s.commit()

    run = await waiting_run(loop_client, t)
    r = await loop_client.post(
        f"/v1/runs/{run['id']}/reject",
        headers=t.auth("admin"),
        json={"reason": "  answers got too terse  "},
    )
    assert r.status_code == 202, r.text
    done = await wait_for_run(loop_client, t, run["id"])
    why = f"rejected by admin ({t.admin_key_id}): answers got too terse"
    assert done["status"] == "succeeded" and done["reason"] == f"not promoted: {why}", done
    listed = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    assert [(v["id"], v["status"], v["live"], v["reason"]) for v in listed] == [
        (run["adapter_version_id"], "rejected", False, why)
    ]
    assert await served_by(loop_client, t) != run["adapter_version_id"]
    r = await loop_client.post(f"/v1/runs/{run['id']}/approve", headers=t.auth("admin"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_awaiting_approval"


@pytest.fixture(scope="module")
async def dashboard_app(backend: Backend, temporal: WorkflowEnvironment) -> AsyncIterator[FastAPI]:
    """The dashboard wired to the test Temporal server (the pages' own app has none)."""
    settings = backend.settings.model_copy(update={"temporal_address": address(temporal)})
    app = create_app(settings, engine=backend.engine)
    yield app
    await app.state.backend.close()


async def dashboard(app: FastAPI, key: str) -> httpx.AsyncClient:
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test")
    r = await dashboard_login(c, key)
    assert r.status_code == 303, r.text
    return c


@pytest.mark.parametrize("answer", ["approve", "reject"])
async def test_dashboard_buttons(
    answer: str,
    loop_client: httpx.AsyncClient,
    dashboard_app: FastAPI,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t, other = await make_tenant(), await make_tenant()
    run = await waiting_run(loop_client, t)
    page_url = f"/dashboard/runs/{run['id']}"
    mine, theirs = (
        await dashboard(dashboard_app, t.admin),
        await dashboard(dashboard_app, other.admin),
    )
    try:
        page = (await mine.get(page_url)).text
        assert 'id="approve-run"' in page and 'id="reject-run"' in page
        assert f'href="/dashboard/adapters#{run["adapter_version_id"]}"' in page
        assert "Thumbs judge: held-out AUROC" in page and "Waiting for your approval" in page
        assert 'data-active="false"' in page  # the forms are not swapped out under the admin
        token = csrf_of(page)
        action = f"{page_url}/{answer}"
        assert (await mine.post(action)).status_code == 403  # no CSRF token
        foreign = await theirs.post(
            action, data={"csrf_token": csrf_of((await theirs.get("/dashboard")).text)}
        )
        assert foreign.status_code == 404

        r = await mine.post(action, data={"csrf_token": token, "reason": "not on brand"})
        assert r.status_code == 303 and r.headers["location"] == f"{page_url}?notice={DONE[answer]}"
        after = (await mine.get(r.headers["location"])).text
        assert (
            'id="approve-run"' not in after
            and ("Approved" if answer == "approve" else "Rejected") in after
        )
        twice = await mine.post(action, data={"csrf_token": token})
        assert twice.status_code == 409 and "not waiting for approval" in twice.text
    finally:
        await mine.aclose()
        await theirs.aclose()

    done = await wait_for_run(loop_client, t, run["id"])
    who = f"admin ({t.admin_key_id})"
    if answer == "approve":
        assert done["reason"].startswith(f"promoted (approved by {who})"), done
        assert await versions(loop_client, t) == [(run["adapter_version_id"], "promoted", True)]
    else:
        assert done["reason"] == f"not promoted: rejected by {who}: not on brand", done
        assert await versions(loop_client, t) == [(run["adapter_version_id"], "rejected", False)]


async def tuneloop(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """The console script, without blocking the event loop the test's worker runs in."""
    proc = await asyncio.create_subprocess_exec(
        TUNELOOP, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("answer", ["approve", "reject"])
async def test_cli(
    answer: str,
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    temporal: WorkflowEnvironment,
) -> None:
    t = await make_tenant()
    env = tuneloop_env(backend.settings.data_dir, backend.url)
    rc, _, err = await tuneloop("runs", answer, "run_nope", env=env)
    assert rc == 2 and "no run 'run_nope'" in err and "Traceback" not in err, err

    run = await waiting_run(loop_client, t)
    rc, _, err = await tuneloop("runs", answer, run["id"], env=env)  # no TEMPORAL_ADDRESS
    assert rc == 2 and "TEMPORAL_ADDRESS" in err and "Traceback" not in err, err

    env["TEMPORAL_ADDRESS"] = address(temporal)
    extra = ["--reason", "too long-winded"] if answer == "reject" else []
    rc, out, err = await tuneloop("runs", answer, run["id"], *extra, env=env)
    assert rc == 0, err
    printed = json.loads(out)
    assert printed["decision"] == DONE[answer] and printed["decided_by"].startswith("operator")
    done = await wait_for_run(loop_client, t, run["id"])
    if answer == "approve":
        assert done["reason"].startswith("promoted (approved by operator"), done
        assert await versions(loop_client, t) == [(run["adapter_version_id"], "promoted", True)]
    else:
        assert done["reason"].startswith("not promoted: rejected by operator"), done
        assert done["reason"].endswith(" (cli): too long-winded"), done
        assert await versions(loop_client, t) == [(run["adapter_version_id"], "rejected", False)]

    rc, _, err = await tuneloop("runs", answer, run["id"], env=env)
    assert rc == 2 and "not waiting for approval" in err and "Traceback" not in err, err
