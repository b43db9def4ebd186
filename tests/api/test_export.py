"""``GET /v1/export``: a tenant admin takes the tenant's data out, and only the tenant's."""

from __future__ import annotations

import json

import httpx
import pytest

from core import export
from tests.conftest import TenantKeys


async def _seed(client: httpx.AsyncClient, t: TenantKeys, marker: str) -> str:
    items = [
        {"prompt": f"{marker} question {i}?", "completion": f"{marker} answer {i}", "rating": 1}
        for i in range(5)
    ]
    r = await client.post("/v1/feedback", headers=t.auth(), json={"items": items})
    assert r.status_code == 201, r.text
    answer = await client.post(
        "/v1/chat/completions",
        headers=t.auth(),
        json={"model": "base", "messages": [{"role": "user", "content": marker}], "max_tokens": 2},
    )
    interaction_id: str = answer.json()["interaction_id"]
    r = await client.post(
        "/v1/feedback", headers=t.auth(), json={"interaction_id": interaction_id, "rating": "down"}
    )
    assert r.status_code == 201, r.text
    return interaction_id


async def test_a_tenant_exports_its_own_data_and_nothing_else(
    client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(export, "BATCH", 2)  # several pages per kind
    a, b = await make_tenant(), await make_tenant()
    a_answer = await _seed(client, a, "alpha-marker")
    await _seed(client, b, "bravo-marker")

    r = await client.get("/v1/export", headers=a.auth("admin"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in r.text.splitlines()]
    kinds = [row["object"] for row in rows]
    assert kinds.count("feedback") == 6 and kinds.count("interaction") == 1
    assert len({row["id"] for row in rows}) == len(rows)  # no page read twice
    (interaction,) = [row for row in rows if row["object"] == "interaction"]
    assert interaction["id"] == a_answer and interaction["messages"][0]["content"] == "alpha-marker"
    assert "alpha-marker question 4?" in r.text and "bravo-marker" not in r.text

    b_export = (await client.get("/v1/export", headers=b.auth("admin"))).text
    assert "bravo-marker" in b_export and "alpha-marker" not in b_export
    # A product key (what the product's servers hold) cannot take the data out.
    assert (await client.get("/v1/export", headers=a.auth())).status_code == 403
