"""POST/GET /v1/feedback on SQLite and PostgreSQL: durable, idempotent, all-or-nothing."""

from __future__ import annotations

import asyncio
import json

import httpx
from sqlalchemy import func, select

from core.db import create_sessionmaker
from core.models import Feedback, Interaction
from tests.conftest import Backend, TenantKeys


def inline(i: int = 0, **extra: object) -> dict[str, object]:
    return {"prompt": f"question {i}?", "completion": f"answer {i}.", "rating": "up", **extra}


async def count_feedback(backend: Backend, tenant_id: str) -> int:
    async with create_sessionmaker(backend.engine)() as s:
        n = await s.scalar(
            select(func.count()).select_from(Feedback).where(Feedback.tenant_id == tenant_id)
        )
    return int(n or 0)


async def add_interaction(backend: Backend, tenant_id: str) -> str:
    async with create_sessionmaker(backend.engine)() as s:
        row = Interaction(
            tenant_id=tenant_id,
            model="base",
            messages=[{"role": "user", "content": "hi"}],
            completion="hello",
        )
        s.add(row)
        await s.commit()
        return row.id


async def test_single_item_is_stored_and_returned(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    r = await client.post(
        "/v1/feedback",
        headers=tenant.auth(),
        json=inline(
            1,
            rating=-1,
            comment="too long",
            correction="shorter",
            user_id="u1",
            metadata={"screen": "chat"},
            score=0.25,
        ),
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("fb_") and body["rating"] == -1
    assert body["metadata"] == {"screen": "chat"} and body["correction"] == "shorter"
    assert await count_feedback(backend, tenant.id) == 1


async def test_rating_spellings(client: httpx.AsyncClient, tenant: TenantKeys) -> None:
    for given, stored in (("up", 1), ("down", -1), (1, 1), (-1, -1), ("UP", 1)):
        r = await client.post("/v1/feedback", headers=tenant.auth(), json=inline(rating=given))
        assert r.status_code == 201, (given, r.text)
        assert r.json()["rating"] == stored
    for bad in ("meh", 0, 2, True, None, 0.5):
        r = await client.post("/v1/feedback", headers=tenant.auth(), json=inline(rating=bad))
        assert r.status_code == 422, (bad, r.text)
        assert "rating" in r.json()["error"]["message"]


async def test_messages_and_interaction_sources(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = await client.post(
        "/v1/feedback",
        headers=tenant.auth(),
        json={"messages": msgs, "completion": "hello", "rating": "up"},
    )
    assert r.status_code == 201 and r.json()["messages"] == msgs
    interaction = await add_interaction(backend, tenant.id)
    r = await client.post(
        "/v1/feedback",
        headers=tenant.auth(),
        json={"interaction_id": interaction, "rating": "down"},
    )
    assert r.status_code == 201 and r.json()["interaction_id"] == interaction


async def test_source_rules(client: httpx.AsyncClient, tenant: TenantKeys) -> None:
    cases = [
        ({"rating": "up"}, "interaction_id"),
        ({"prompt": "p", "rating": "up"}, "completion"),
        (
            {
                "prompt": "p",
                "messages": [{"role": "user", "content": "x"}],
                "completion": "c",
                "rating": "up",
            },
            "not both",
        ),
        ({"interaction_id": "int_x", "completion": "c", "rating": "up"}, "not both"),
        (
            {"messages": [{"role": "robot", "content": "x"}], "completion": "c", "rating": "up"},
            "role",
        ),
        ({**inline(), "ratting": "up"}, "ratting"),
    ]
    for body, hint in cases:
        r = await client.post("/v1/feedback", headers=tenant.auth(), json=body)
        assert r.status_code == 422, body
        err = r.json()["error"]
        assert err["code"] == "invalid_input"
        assert hint in json.dumps(err), (hint, err)


async def test_unknown_and_foreign_interactions_are_refused(
    client: httpx.AsyncClient,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await make_tenant(), await make_tenant()
    foreign = await add_interaction(backend, a.id)
    for interaction in ("int_doesnotexist", foreign):
        r = await client.post(
            "/v1/feedback", headers=b.auth(), json={"interaction_id": interaction, "rating": "up"}
        )
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["code"] == "unknown_interaction"
        assert err["details"][0]["index"] == 0
    assert await count_feedback(backend, b.id) == 0


async def test_idempotent_retry_returns_the_original(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    first = await client.post(
        "/v1/feedback", headers=tenant.auth(), json=inline(idempotency_key="k-1")
    )
    again = await client.post(
        "/v1/feedback", headers=tenant.auth(), json=inline(idempotency_key="k-1", rating="down")
    )
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert await count_feedback(backend, tenant.id) == 1


async def test_same_idempotency_key_in_two_tenants_is_two_records(
    client: httpx.AsyncClient,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    a, b = await make_tenant(), await make_tenant()
    ra = await client.post("/v1/feedback", headers=a.auth(), json=inline(idempotency_key="same"))
    rb = await client.post("/v1/feedback", headers=b.auth(), json=inline(idempotency_key="same"))
    assert ra.status_code == rb.status_code == 201
    assert ra.json()["id"] != rb.json()["id"]


async def test_batch_stores_all_and_reports_replays(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    first = await client.post(
        "/v1/feedback", headers=tenant.auth(), json=inline(idempotency_key="b-3")
    )
    items = [inline(i, idempotency_key=f"b-{i}") for i in range(10)]
    r = await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["created"], body["replayed"]) == (9, 1)
    assert [d["idempotency_key"] for d in body["data"]] == [f"b-{i}" for i in range(10)]
    assert [d["status"] for d in body["data"]].count("replayed") == 1
    assert body["data"][3]["id"] == first.json()["id"]
    assert await count_feedback(backend, tenant.id) == 10
    r = await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    assert r.status_code == 200 and r.json()["created"] == 0
    assert await count_feedback(backend, tenant.id) == 10


async def test_batch_is_all_or_nothing_with_positions(
    client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend
) -> None:
    items = [inline(i) for i in range(6)]
    items[3] = inline(3, rating="sideways")
    items[5] = {"prompt": "x", "rating": "up"}
    r = await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    assert r.status_code == 422
    details = r.json()["error"]["details"]
    assert {d["index"] for d in details} == {3, 5}
    assert "items[3].rating" in {d["field"] for d in details}
    dup = [inline(i, idempotency_key="dup") for i in range(2)]
    r = await client.post("/v1/feedback", headers=tenant.auth(), json={"items": dup})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["index"] == 1
    assert await count_feedback(backend, tenant.id) == 0


async def test_limits(client: httpx.AsyncClient, tenant: TenantKeys, backend: Backend) -> None:
    big = "x" * (32 * 1024 + 1)
    for body in (
        inline(completion=big),
        inline(comment=big),
        inline(metadata={"blob": "y" * 9000}),
        {"items": []},
        {"items": [inline(i) for i in range(1001)]},
        inline(user_id="u" * 300),
    ):
        r = await client.post("/v1/feedback", headers=tenant.auth(), json=body)
        assert r.status_code == 422, r.text[:200]
        assert r.json()["error"]["message"]
    ok = await client.post(
        "/v1/feedback", headers=tenant.auth(), json={"items": [inline(i) for i in range(1000)]}
    )
    assert ok.status_code == 201 and ok.json()["created"] == 1000
    assert await count_feedback(backend, tenant.id) == 1000


async def test_malformed_bodies(client: httpx.AsyncClient, tenant: TenantKeys) -> None:
    headers = {**tenant.auth(), "Content-Type": "application/json"}
    r = await client.post("/v1/feedback", headers=headers, content=b'{"rating": "up",')
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    for body in (b"[]", b'"up"', b"42", b'{"items": "all"}', b'{"items": [1, 2]}'):
        r = await client.post("/v1/feedback", headers=headers, content=body)
        assert r.status_code == 422, body
    huge = b'{"items": [' + b",".join([json.dumps(inline()).encode()] * 300_000) + b"]}"
    r = await client.post("/v1/feedback", headers=headers, content=huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_list_pages_newest_first_with_filters(
    client: httpx.AsyncClient, tenant: TenantKeys
) -> None:
    items = [inline(i, rating="up" if i % 3 else "down", user_id=f"u{i % 2}") for i in range(25)]
    await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/v1/feedback", headers=tenant.auth("admin"), params=params)
        assert r.status_code == 200
        page = r.json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert len(seen) == 25 == len(set(seen)) and seen == sorted(seen, reverse=True)
    r = await client.get(
        "/v1/feedback",
        headers=tenant.auth("admin"),
        params={"rating": "down", "user_id": "u0", "limit": 100},
    )
    want = [i for i in range(25) if i % 3 == 0 and i % 2 == 0]
    assert sorted(d["prompt"] for d in r.json()["data"]) == sorted(f"question {i}?" for i in want)
    r = await client.get("/v1/feedback", headers=tenant.auth("admin"), params={"limit": 0})
    assert r.status_code == 422


async def test_stats(client: httpx.AsyncClient, tenant: TenantKeys) -> None:
    items = [inline(i, rating="up" if i < 7 else "down") for i in range(10)]
    await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    r = await client.get("/v1/feedback/stats", headers=tenant.auth("admin"), params={"days": 3})
    assert r.status_code == 200
    s = r.json()
    assert (s["total"], s["up"], s["down"]) == (10, 7, 3)
    assert abs(s["up_rate"] - 0.7) < 1e-9
    assert len(s["days"]) == 3 and s["days"][-1]["total"] == 10
    assert s["days"][0]["total"] == 0 and s["days"][0]["up_rate"] is None


async def test_what_is_stored_is_what_was_sent(
    client: httpx.AsyncClient, tenant: TenantKeys
) -> None:
    """Read back through the database (the POST answer is built before the read side sees it)."""
    msgs = [{"role": "user", "content": "héllo ✓"}, {"role": "assistant", "content": "hi"}]
    items = [
        {"messages": msgs, "completion": "c0", "rating": "up", "metadata": {"k": [1, {"x": None}]}},
        {
            "prompt": "p1",
            "completion": "c1",
            "rating": "down",
            "score": 0.5,
            "comment": "meh",
            "correction": "better",
            "user_id": "u",
            "idempotency_key": "rt-1",
        },
    ]
    sent = await client.post("/v1/feedback", headers=tenant.auth(), json={"items": items})
    assert sent.status_code == 201
    got = (await client.get("/v1/feedback", headers=tenant.auth("admin"))).json()["data"]
    by_completion = {d["completion"]: d for d in got}
    first, second = by_completion["c0"], by_completion["c1"]
    assert first["messages"] == msgs and first["metadata"] == {"k": [1, {"x": None}]}
    assert first["prompt"] is None and first["score"] is None
    assert second["messages"] is None and second["metadata"] is None
    assert (second["rating"], second["score"], second["comment"], second["correction"]) == (
        -1,
        0.5,
        "meh",
        "better",
    )
    assert second["idempotency_key"] == "rt-1"


async def test_concurrent_requests_share_commits_but_not_fates(
    client: httpx.AsyncClient,
    make_tenant,
    backend: Backend,  # type: ignore[no-untyped-def]
) -> None:
    """Concurrent POSTs are grouped into shared commits: a retry race still yields one row, and a
    bad request in the same group fails alone."""
    a, b = await make_tenant(), await make_tenant()
    interaction = await add_interaction(backend, a.id)

    def post(t: TenantKeys, body: dict[str, object]):  # type: ignore[no-untyped-def]
        return client.post("/v1/feedback", headers=t.auth(), json=body)

    bodies = (
        [(a, inline(0, idempotency_key="race")) for _ in range(20)]
        + [(b, inline(i)) for i in range(20)]
        + [(a, {"interaction_id": "int_missing", "rating": "up"})]
        + [(b, {"interaction_id": interaction, "rating": "up"})]  # A's interaction, B's key
        + [(a, {"interaction_id": interaction, "rating": "down"})]
    )
    responses = await asyncio.gather(*(post(t, body) for t, body in bodies))
    race = responses[:20]
    assert sorted(r.status_code for r in race) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in race}) == 1
    assert all(r.status_code == 201 for r in responses[20:40])
    assert [r.status_code for r in responses[40:]] == [422, 422, 201]
    assert await count_feedback(backend, a.id) == 2
    assert await count_feedback(backend, b.id) == 20


async def test_nul_characters_are_refused_not_a_server_error(
    client: httpx.AsyncClient, tenant: TenantKeys, platform_key: str
) -> None:
    for body in (
        inline(completion="a\u0000b"),
        inline(metadata={"k\u0000": 1}),
        {"items": [inline(), inline(user_id="u\u0000")]},
    ):
        r = await client.post("/v1/feedback", headers=tenant.auth(), json=body)
        assert r.status_code == 422 and "NUL" in r.json()["error"]["message"], r.text
    r = await client.post(
        "/v1/tenants",
        headers={"Authorization": f"Bearer {platform_key}"},
        json={"slug": "nul-name", "name": "a\u0000"},
    )
    assert r.status_code == 422
