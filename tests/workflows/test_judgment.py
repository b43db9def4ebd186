"""The default gate on the dev server, with feedback shaped like a real product's logs: every
question asked once, one answer each, unpaired thumbs. Nothing here turns a check off: the
policy changes only how the tiny model trains."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from tests.conftest import Backend, TenantKeys, short_or_long
from tests.workflows.conftest import wait_for_run

pytestmark = pytest.mark.usefixtures("worker")

# Training settings only; every gate setting keeps its default. The tiny random model needs a
# strong push to change its answers: with KTO's default beta (0.1) the loss is satisfied by a
# per-token shift so small (KL 0.03) that whether greedy answers change depends on the CPU's
# rounding; on one machine base and candidate both answered nothing and every comparison tied.
# A beta of 0.01 changed them on every training seed tried (4 of 4).
TRAIN_ONLY = {"min_feedback": 8, "max_steps": 120, "rank": 8, "learning_rate": 1e-2, "beta": 0.01}


def logs(seed: int, *, coin_flips: bool = False, n: int = 80) -> list[dict[str, Any]]:
    """One answer per distinct question; its user liked it when it was short (or, for a
    coin-flip tenant, at random)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        short = i % 2 == 0
        answer = short_or_long(rng, short=short)
        liked = rng.random() < 0.5 if coin_flips else short
        items.append(
            {
                "prompt": f"question {seed}-{i}: how do I fix thing number {i * 7 % 13}?",
                "completion": answer,
                "rating": "up" if liked else "down",
                "user_id": f"user-{i % 5}",
            }
        )
    return items


@pytest.fixture(autouse=True)
def sqlite_only(backend: Backend) -> None:
    # Judgment does not depend on the database, and each run trains and evaluates for minutes.
    if backend.name != "sqlite":
        pytest.skip("the default-gate runs go once per session, on the SQLite backend")


async def run_with_default_gate(
    client: httpx.AsyncClient, tenant: TenantKeys, items: list[dict[str, Any]]
) -> dict[str, Any]:
    r = await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    assert r.status_code == 201, r.text
    r = await client.put("/v1/policy", headers=tenant.auth("admin"), json=TRAIN_ONLY)
    assert r.status_code == 200, r.text
    policy = r.json()
    assert policy["min_win_rate"] == 0.5 and policy["max_capability_drop"] == 0.05
    r = await client.post("/v1/runs", headers=tenant.auth("admin"), json={})
    assert r.status_code == 202, r.text
    return await wait_for_run(client, tenant, r.json()["id"], timeout=600)


async def test_unpaired_thumbs_are_promoted_by_the_default_gate(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    # Most served answers get no thumb: those questions are judged in the win rate too.
    unrated = 12
    for i in range(unrated):
        question = f"question 1-unrated-{i}: how do I fix thing number {i * 5 % 13}?"
        r = await loop_client.post(
            "/v1/chat/completions",
            headers=t.auth(),
            json={
                "model": "default",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 4,
            },
        )
        assert r.status_code == 200, r.text
    run = await run_with_default_gate(loop_client, t, logs(seed=1))
    assert run["status"] == "succeeded" and run["reason"].startswith("promoted"), run
    assert run["method"] == "kto"  # what auto chose: 56 questions are too few for GRPO
    versions = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    report = versions[0]["eval_report"]
    assert versions[0]["status"] == "promoted"
    assert report["n_holdout_pairs"] == 0 and report["tenant_metric"] == "thumbs"
    judged = report["judge"]["n_train"] + report["n_holdout_thumbs"]
    assert report["judge_trusted"] and report["judge"]["auroc"]["n"] == judged
    win = report["ci"]["win_rate"]
    assert win["low"] >= 0.5 and win["n"] == report["n_win_prompts"]
    assert report["n_win_prompts"] == report["n_holdout_thumbs"] + unrated
    assert report["n_capability"] >= 80 and report["capability_drop"] <= 0.05
    assert len(report["samples"]) >= 3
    assert "win rate" in run["reason"] and "capability" in run["reason"]


async def test_a_coin_flip_tenant_is_not_promoted(
    loop_client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    t = await make_tenant()
    run = await run_with_default_gate(loop_client, t, logs(seed=2, coin_flips=True))
    assert run["status"] == "succeeded" and run["reason"].startswith("not promoted"), run
    assert "win_rate" in run["reason"]
    versions = (await loop_client.get("/v1/adapters", headers=t.auth("admin"))).json()["data"]
    assert versions[0]["status"] == "rejected" and not versions[0]["live"]
    assert not versions[0]["eval_report"]["judge_trusted"]
