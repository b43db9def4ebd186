"""Budgets and the ledger without Stripe: a tenant admin's monthly cap refuses runs that would pass
it (402 with the numbers) and, by policy, inference once it is reached; usage shows either way."""

from __future__ import annotations

from decimal import Decimal

import httpx

from core.usage import INFERENCE_TOKENS
from tests.billing.conftest import add_usage
from tests.conftest import Backend, TenantKeys

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def put_policy(client: httpx.AsyncClient, t: TenantKeys, **policy: object) -> None:
    r = await client.put("/v1/policy", headers=t.auth("admin"), json=policy)
    assert r.status_code == 200, r.text


async def feedback(client: httpx.AsyncClient, t: TenantKeys, n: int, words: int) -> None:
    items = [
        {"prompt": "p" * (4 * words), "completion": "", "rating": "up" if i % 2 else "down"}
        for i in range(n)
    ]
    r = await client.post("/v1/feedback", headers=t.auth(), json={"items": items})
    assert r.status_code == 201, r.text


async def test_without_stripe_the_ledger_shows_usage_and_cost(
    client: httpx.AsyncClient, tenant: TenantKeys
) -> None:
    r = await client.post("/v1/chat/completions", headers=tenant.auth(), json=CHAT)
    assert r.status_code == 200, r.text
    tokens = r.json()["usage"]["total_tokens"]
    body = (await client.get("/v1/usage", headers=tenant.auth("admin"))).json()
    inference = next(m for m in body["meters"] if m["meter"] == INFERENCE_TOKENS)
    assert inference["quantity"] == tokens > 0
    assert Decimal(inference["cost_usd"]) == Decimal(tokens) * Decimal("0.002") / 1000
    assert inference["unreported_rows"] == 1 and inference["reported_rows"] == 0
    assert body["billing"] == {
        "status": "active",
        "reason": None,
        "stripe_configured": False,
        "stripe_customer_id": None,
    }
    assert body["currency"] == "usd" and body["monthly_budget_usd"] is None


async def test_a_run_over_budget_is_refused_with_the_numbers(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    await put_policy(client, tenant, epochs=1.0, monthly_budget_usd=0.05)
    await feedback(client, tenant, n=10, words=300)  # ~3,000 training tokens: $0.03 a run
    estimate = (await client.get("/v1/usage", headers=tenant.auth("admin"))).json()[
        "next_run_estimate"
    ]
    assert estimate["training_tokens"] == 3000 and Decimal(estimate["cost_usd"]) == Decimal("0.03")
    assert estimate["within_budget"] is True

    await add_usage(backend, tenant.id, 15_000)  # $0.03 of inference: $0.06 with the run
    usage = (await client.get("/v1/usage", headers=tenant.auth("admin"))).json()
    assert usage["next_run_estimate"]["within_budget"] is False
    assert Decimal(usage["next_run_estimate"]["projected_usd"]) == Decimal("0.06")

    r = await client.post("/v1/runs", headers=tenant.auth("admin"), json={})
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert "about $0.03" in error["message"] and "budget is $0.05" in error["message"]
    assert error["details"]["monthly_budget_usd"] == "0.05"
    assert Decimal(error["details"]["spent_usd"]) == Decimal("0.03")

    # Raising the cap lets it through billing (this app has no Temporal to start it on).
    await put_policy(client, tenant, epochs=1.0, monthly_budget_usd=1)
    r = await client.post("/v1/runs", headers=tenant.auth("admin"), json={})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "orchestration_unavailable")


async def test_inference_over_budget_follows_the_policy(
    client: httpx.AsyncClient, make_tenant, backend: Backend
) -> None:  # type: ignore[no-untyped-def]
    allow, block = await make_tenant(), await make_tenant()
    await put_policy(client, allow, monthly_budget_usd=0.01)
    await put_policy(client, block, monthly_budget_usd=0.01, inference_over_budget="block")
    for t in (allow, block):
        await add_usage(backend, t.id, 5_000)  # exactly $0.01: the budget is reached
    assert (
        await client.post("/v1/chat/completions", headers=allow.auth(), json=CHAT)
    ).status_code == 200
    r = await client.post("/v1/chat/completions", headers=block.auth(), json=CHAT)
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert "$0.01" in error["message"] and "inference_over_budget" in error["message"]


async def test_under_budget_inference_is_answered(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    await put_policy(client, tenant, monthly_budget_usd=1, inference_over_budget="block")
    await add_usage(backend, tenant.id, 1000)
    r = await client.post("/v1/chat/completions", headers=tenant.auth(), json=CHAT)
    assert r.status_code == 200, r.text


async def test_budget_must_be_sane(client: httpx.AsyncClient, tenant: TenantKeys) -> None:
    for bad in ({"monthly_budget_usd": -1}, {"inference_over_budget": "maybe"}):
        r = await client.put("/v1/policy", headers=tenant.auth("admin"), json=bad)
        assert r.status_code == 422, r.text


async def test_usage_since_a_date(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    await add_usage(backend, tenant.id, 100)
    for since, status in (
        ("2020-01-01T00:00:00", 200),  # no zone: UTC
        ("2020-01-01T00:00:00+02:00", 200),
        ("2999-01-01T00:00:00Z", 200),
        ("last tuesday", 422),
        ("0001-01-01T00:00:00Z", 200),
        ("9999-12-31T23:59:59Z", 200),
        ("0001-01-01T00:00:00+05:00", 422),  # before year 1 in UTC
    ):
        r = await client.get("/v1/usage", params={"since": since}, headers=tenant.auth("admin"))
        assert r.status_code == status, (since, r.text)
        if status == 200:
            quantity = r.json()["meters"][0]["quantity"]
            assert quantity == (0 if since.startswith(("2999", "9999")) else 100), since
