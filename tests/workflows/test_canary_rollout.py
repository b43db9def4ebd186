"""``rollout: canary`` on the dev server and the tiny model: the run's candidate answers a share
of end users beside the live version, and their thumbs promote it or roll it back; its time
running out, or the run's cancel, leaves the live version in place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from serving import registry
from tests.conftest import Backend, TenantKeys
from tests.serving.adapters import make_adapter
from tests.workflows.conftest import api_client, setup_tenant, wait_for_run, wait_until_waiting

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(autouse=True)
def sqlite_only(backend: Backend) -> None:
    # The arms' queries and the canary's end run on both databases in tests/serving/
    # test_canary.py; here each case trains a run, and the suite's time is better spent once.
    if backend.name != "sqlite":
        pytest.skip("the canary rollout runs once per session, on the SQLite backend")


USERS = [f"end-user-{i}" for i in range(60)]


@pytest.fixture
async def slow_look_client(
    backend: Backend, temporal: WorkflowEnvironment, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    """An API client whose runs look at their canary an hour apart (bounded by the canary's 6
    minutes): a run that ends within a test's minute was told by the API, not by its timer."""
    async with api_client(backend, temporal, canary_poll_s=3600) as c:
        yield c


async def canary_run(
    client: httpx.AsyncClient, t: TenantKeys, *, timeout: float = 180, **policy: Any
) -> dict[str, Any]:
    """Start a run with ``rollout: canary`` and return it once its canary is live."""
    # Six minutes at most: the canary is looked at every half second (a 72-hour one, every
    # 5.4 minutes, which bounds the workflow's history).
    policy = {"canary_max_hours": 0.1} | policy
    await setup_tenant(
        client, t, rollout="canary", canary_fraction=0.5, canary_min_thumbs=5, **policy
    )
    r = await client.post("/v1/runs", headers=t.auth("admin"))
    assert r.status_code == 202, r.text
    return await wait_until_waiting(client, t, r.json()["id"], "canary", timeout=timeout)


async def answer_users(client: httpx.AsyncClient, t: TenantKeys) -> dict[str, list[str]]:
    """One answer to ``default`` per end user; interaction ids by the version that answered."""
    by_version: dict[str, list[str]] = {}
    for user in USERS:
        r = await client.post(
            "/v1/chat/completions",
            headers=t.auth(),
            json={
                "model": "default",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "user": user,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == r.headers["x-served-by"]
        by_version.setdefault(r.headers["x-served-by"], []).append(r.json()["interaction_id"])
    return by_version


async def rate(
    client: httpx.AsyncClient, t: TenantKeys, interactions: list[str], rating: str
) -> None:
    items = [{"interaction_id": i, "rating": rating} for i in interactions]
    r = await client.post("/v1/feedback", headers=t.auth(), json={"items": items})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("candidate_liked", [True, False], ids=["better", "worse"])
async def test_live_thumbs_promote_a_better_candidate_and_roll_back_a_worse_one(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    candidate_liked: bool,
) -> None:
    t = await make_tenant()
    run = await canary_run(loop_client, t)
    version = run["adapter_version_id"]
    deployment = (await loop_client.get("/v1/deployment", headers=t.auth("admin"))).json()
    assert deployment["current"]["version_id"] is None  # base answers the other users
    assert deployment["canary"]["version_id"] == version
    assert deployment["canary"]["fraction"] == 0.5

    answered = await answer_users(loop_client, t)
    assert set(answered) == {version, "base"}, answered  # both arms serve
    await rate(loop_client, t, answered[version], "up" if candidate_liked else "down")
    await rate(loop_client, t, answered["base"], "down" if candidate_liked else "up")

    run = await wait_for_run(loop_client, t, run["id"], timeout=120)
    assert run["status"] == "succeeded", run
    progress = run["progress"]
    assert progress["canary"]["candidate"]["up" if candidate_liked else "down"] == len(
        answered[version]
    )
    assert progress.get("waiting_for") is None
    deployment = (await loop_client.get("/v1/deployment", headers=t.auth("admin"))).json()
    assert deployment["canary"] is None
    adapters = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    mine = next(a for a in adapters if a["id"] == version)
    if candidate_liked:
        assert run["reason"].startswith("promoted after a canary: P(candidate better)"), run
        assert deployment["current"]["version_id"] == version
        assert mine["status"] == "promoted" and mine["live"]
    else:
        assert run["reason"].startswith("not promoted: the canary rolled back: P("), run
        assert deployment["current"]["version_id"] is None
        assert mine["status"] == "rejected" and not mine["live"]
        assert mine["reason"].startswith("rolled back by its canary")
    events = (await loop_client.get(f"/v1/runs/{run['id']}/events", headers=t.auth("admin"))).json()
    assert any("canary: version" in e["message"] for e in events["data"]), events


async def test_a_canary_without_a_decision_expires_and_the_live_version_stays(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    run = await canary_run(loop_client, t, canary_max_hours=0.002)  # 7.2 s, no thumbs
    run = await wait_for_run(loop_client, t, run["id"], timeout=60)
    assert run["status"] == "succeeded" and not run["reason"].startswith("promoted"), run
    assert "the canary expired" in run["reason"] and "the current version stays" in run["reason"]
    deployment = (await loop_client.get("/v1/deployment", headers=t.auth("admin"))).json()
    assert deployment["canary"] is None and deployment["current"]["version_id"] is None


async def test_an_admin_decides_during_the_canary_or_cancels_the_run(
    loop_client: httpx.AsyncClient,
    slow_look_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
) -> None:
    # Promoted by hand: the run ends promoted, saying who decided, at once (the API signals the
    # run: its next look would be minutes away).
    t = await make_tenant()
    run = await canary_run(slow_look_client, t)
    r = await slow_look_client.post("/v1/deployment/canary/promote", headers=t.auth("admin"))
    assert r.status_code == 200, r.text
    run = await wait_for_run(slow_look_client, t, run["id"], timeout=60)
    assert run["reason"].startswith(
        "promoted after a canary: canary promoted by an admin (the gate: promote: "
    ), run

    # The run cancelled: its canary ends and the live version goes on answering everyone.
    u = await make_tenant()
    run = await canary_run(loop_client, u)
    r = await loop_client.post(f"/v1/runs/{run['id']}/cancel", headers=u.auth("admin"))
    assert r.status_code == 202, r.text
    run = await wait_for_run(loop_client, u, run["id"], timeout=60)
    assert run["status"] == "cancelled", run
    deployment = (await loop_client.get("/v1/deployment", headers=u.auth("admin"))).json()
    assert deployment["canary"] is None and deployment["current"]["version_id"] is None
    adapters = (await loop_client.get("/v1/adapters", headers=u.auth("admin"))).json()["data"]
    assert adapters[0]["status"] == "rejected" and adapters[0]["reason"] == "the run was cancelled"

    # Another version promoted by hand ends the canary before its users decided: the run does
    # not promote its candidate, which is rejected saying why, and the hand promotion stands.
    w = await make_tenant()
    run = await canary_run(loop_client, w)
    store = ArtifactStore(backend.settings.data_dir / "artifacts")
    async with create_sessionmaker(backend.engine)() as s:
        other = await registry.register_adapter(
            s,
            store,
            tenant_id=w.id,
            adapter_dir=make_adapter(backend.settings.data_dir, tmp_path / "other", seed=71),
            base_model="tiny-random",
        )
    r = await loop_client.post(f"/v1/adapters/{other.id}/promote", headers=w.auth("admin"))
    assert r.status_code == 200, r.text
    run = await wait_for_run(loop_client, w, run["id"], timeout=60)
    assert run["status"] == "succeeded" and run["reason"].startswith("not promoted"), run
    assert "changed by hand" in run["reason"], run
    deployment = (await loop_client.get("/v1/deployment", headers=w.auth("admin"))).json()
    assert deployment["canary"] is None and deployment["current"]["version_id"] == other.id
    adapters = (await loop_client.get("/v1/adapters", headers=w.auth("admin"))).json()["data"]
    candidate = next(a for a in adapters if a["id"] == run["adapter_version_id"])
    assert candidate["status"] == "rejected" and "changed by hand" in candidate["reason"]
