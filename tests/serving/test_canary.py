"""A live canary by hand, on the local backend and real HTTP: a share of end users gets the
candidate for ``default``, each user stays on one arm, thumbs are counted per arm, and an admin
promotes or aborts it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from core import deployments
from core.canary import CanaryRule, decide
from core.db import create_sessionmaker
from serving.types import FALLBACK
from tests.conftest import Backend, TenantKeys
from tests.serving.adapters import make_adapter
from tests.serving.test_fallback_and_unload import corrupt
from tests.serving.test_fallback_and_unload import register as register_ref
from tests.serving.test_inference import PROMPT, oai, register


@pytest.fixture(scope="session")
def canary_adapters(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp(f"canary-adapters-{backend.name}")
    return [make_adapter(backend.settings.data_dir, root / f"c{i}", seed=40 + i) for i in (0, 1)]


async def _ask(c: AsyncOpenAI, user: str) -> tuple[str, str, str]:
    """(served by, interaction id, answer) for one end user's request to ``default``."""
    raw = await c.chat.completions.with_raw_response.create(
        model="default",
        messages=PROMPT,
        max_tokens=8,
        temperature=0,
        user=user,  # type: ignore[arg-type]
    )
    parsed = raw.parse()
    # The SDK's own field names the version that answered, as the header does.
    assert parsed.model == raw.headers["X-Served-By"]
    answer = parsed.choices[0].message.content or ""
    return raw.headers["X-Served-By"], raw.headers["X-Interaction-Id"], answer


async def test_a_canary_splits_users_counts_their_thumbs_and_is_promoted_or_aborted(
    client: httpx.AsyncClient,
    make_tenant,
    backend: Backend,
    canary_adapters: list[Path],  # type: ignore[no-untyped-def]
) -> None:
    a: TenantKeys = await make_tenant()
    v1, v2 = [await register(backend, a.id, d) for d in canary_adapters]
    admin = a.auth("admin")
    await client.post(f"/v1/adapters/{v1}/promote", headers=admin)

    r = await client.get("/v1/deployment", headers=admin)
    assert r.status_code == 200 and r.json()["current"]["version_id"] == v1
    assert r.json()["canary"] is None
    for bad, code in (({"version_id": v2, "fraction": 0.9}, 422), ({"version_id": v1}, 409)):
        assert (
            await client.post("/v1/deployment/canary", headers=admin, json=bad)
        ).status_code == code
    r = await client.post(
        "/v1/deployment/canary", headers=admin, json={"version_id": v2, "fraction": 0.5}
    )
    assert r.status_code == 200, r.text
    canary = r.json()["canary"]
    assert canary["version_id"] == v2 and canary["fraction"] == 0.5 and canary["p_better"] is None
    again = await client.post("/v1/deployment/canary", headers=admin, json={"version_id": v2})
    assert again.status_code == 409 and again.json()["error"]["code"] == "canary_running"

    # Each user stays on one arm; both arms serve someone.
    c = oai(client, a.product)
    arm_of: dict[str, str] = {}
    answers: dict[str, str] = {}
    interactions: dict[str, list[str]] = {v1: [], v2: []}
    for i in range(16):
        user = f"user-{i}"
        for _ in range(2):
            served, interaction, answer = await _ask(c, user)
            assert arm_of.setdefault(user, served) == served, user
            assert answers.setdefault(served, answer) == answer  # one version, one answer
            interactions[served].append(interaction)
    assert set(arm_of.values()) == {v1, v2} and answers[v1] != answers[v2]

    # Users like the candidate's answers and not the current one's.
    for version, rating in ((v2, "up"), (v1, "down")):
        items = [
            {"interaction_id": i, "rating": rating, "user_id": f"rater-{n}"}
            for n, i in enumerate(interactions[version])
        ]
        r = await client.post("/v1/feedback", headers=a.auth("product"), json={"items": items})
        assert r.status_code in (200, 201, 202), r.text
    # A request asking for a version by id is not part of the canary.
    await c.chat.completions.create(model=v2, messages=PROMPT, max_tokens=4)  # type: ignore[arg-type]
    canary = (await client.get("/v1/deployment", headers=admin)).json()["canary"]
    arms = canary["arms"]
    assert arms["candidate"]["up"] == len(interactions[v2]) and arms["candidate"]["down"] == 0
    assert arms["current"]["down"] == len(interactions[v1]) and arms["current"]["up"] == 0
    assert arms["candidate"]["requests"] == len(interactions[v2])
    assert canary["p_better"] > 0.99
    # What the workflow's rule reads besides: each arm's p95 time per answer token, from the
    # recorded answers (on both databases).
    async with create_sessionmaker(backend.engine)() as s:
        timed = await deployments.current_canary(s, tenant_id=a.id, latency=True)
    assert timed is not None
    for arm in (timed.current, timed.candidate):
        assert arm.p95_ms is not None and 0 < arm.p95_ms < 60_000, arm

    # Another tenant sees its own deployment, not this canary.
    other = await make_tenant()
    mine = (await client.get("/v1/deployment", headers=other.auth("admin"))).json()
    assert mine["canary"] is None and mine["current"]["version_id"] is None

    # Promote now: everyone gets the candidate.
    r = await client.post("/v1/deployment/canary/promote", headers=admin)
    assert r.status_code == 200 and r.json()["current"]["version_id"] == v2
    assert r.json()["canary"] is None
    assert {(await _ask(c, user))[0] for user in arm_of} == {v2}
    listed = {v["id"]: v for v in (await client.get("/v1/adapters", headers=admin)).json()["data"]}
    assert (
        listed[v2]["status"] == "promoted" and listed[v2]["reason"] == "canary promoted by an admin"
    )
    assert listed[v1]["status"] == "retired"

    # A canary of the retired version, aborted: it is rejected and nobody gets it any more.
    r = await client.post(
        "/v1/deployment/canary", headers=admin, json={"version_id": v1, "fraction": 0.5}
    )
    assert r.status_code == 200
    assert {(await _ask(c, user))[0] for user in arm_of} == {v1, v2}
    r = await client.post("/v1/deployment/canary/abort", headers=admin)
    assert r.status_code == 200 and r.json()["canary"] is None
    assert {(await _ask(c, user))[0] for user in arm_of} == {v2}
    listed = {v["id"]: v for v in (await client.get("/v1/adapters", headers=admin)).json()["data"]}
    assert (
        listed[v1]["status"] == "rejected" and listed[v1]["reason"] == "canary aborted by an admin"
    )
    for action in ("promote", "abort"):
        r = await client.post(f"/v1/deployment/canary/{action}", headers=admin)
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_canary"
    # Product keys cannot steer the deployment.
    assert (await client.get("/v1/deployment", headers=a.auth("product"))).status_code == 403


async def test_requests_an_arm_fails_count_against_it_and_roll_the_candidate_back(
    client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    canary_adapters: list[Path],
    tmp_path: Path,
) -> None:
    """A candidate whose adapter cannot be served fails its arm's requests (503, streamed or
    not) or, where the policy allows, has the base model answer in its place: both count as
    that arm's errors, and the health check rolls it back without waiting for thumbs."""
    a: TenantKeys = await make_tenant()
    live = await register(backend, a.id, canary_adapters[0])
    broken, ref = await register_ref(backend, a.id, make_adapter(
        backend.settings.data_dir, tmp_path / "broken", seed=52))  # fmt: skip
    corrupt(ref)
    admin = a.auth("admin")
    await client.post(f"/v1/adapters/{live}/promote", headers=admin)
    r = await client.post(
        "/v1/deployment/canary", headers=admin, json={"version_id": broken, "fraction": 0.5}
    )
    assert r.status_code == 200, r.text  # the failed preload is logged, not fatal

    body = {"model": "default", "messages": PROMPT, "max_tokens": 4, "temperature": 0}
    answered = failed = 0
    for i in range(12):
        for stream in (False, True):
            r = await client.post(
                "/v1/chat/completions",
                headers=a.auth(),
                json=body | {"user": f"user-{i}", "stream": stream},
            )
            if r.status_code == 200:
                assert r.headers["x-served-by"] == live
                answered += 1
            else:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "adapter_unavailable"
                failed += 1
    assert answered and failed  # both arms were asked

    sessionmaker = create_sessionmaker(backend.engine)
    async with sessionmaker() as s:
        canary = await deployments.current_canary(s, tenant_id=a.id, latency=True)
    assert canary is not None
    assert (canary.current.requests, canary.current.errors) == (answered, 0)
    assert (canary.candidate.requests, canary.candidate.errors) == (failed, failed)

    # Where the tenant allows it the base model answers instead: still the candidate's error.
    r = await client.put("/v1/policy", headers=admin, json={"fallback_to_base": True})
    assert r.status_code == 200
    served: dict[str, list[str]] = {live: [], FALLBACK: []}
    for i in range(12):
        r = await client.post(
            "/v1/chat/completions", headers=a.auth(), json=body | {"user": f"user-{i}"}
        )
        assert r.status_code == 200
        served[r.headers["x-served-by"]].append(r.headers["x-interaction-id"])
    fell_back = len(served[FALLBACK])
    assert fell_back
    # Users like the base model's stand-in answers: no thumb for the candidate, whose arm then
    # has none, so no P(better) either; the current version's thumb counts as before.
    items = [
        {"interaction_id": i, "rating": "up", "user_id": f"rater-{n}"}
        for n, i in enumerate(served[FALLBACK])
    ] + [{"interaction_id": served[live][0], "rating": "down", "user_id": "rater-live"}]
    r = await client.post("/v1/feedback", headers=a.auth("product"), json={"items": items})
    assert r.status_code in (200, 201, 202), r.text
    async with sessionmaker() as s:
        canary = await deployments.current_canary(s, tenant_id=a.id, latency=True)
        assert await deployments.p_better_over_time(s, tenant_id=a.id) == []
    assert canary is not None
    assert canary.candidate.requests == canary.candidate.errors == failed + fell_back
    assert (canary.candidate.thumbs, canary.current.thumbs) == (0, 1)
    verdict = decide(canary.current, canary.candidate, CanaryRule(min_requests=failed))
    assert verdict.action == "rollback" and "failed" in verdict.reason
