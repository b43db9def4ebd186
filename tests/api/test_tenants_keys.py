"""Tenants (platform) and keys (tenant admin): creation, suspension, revocation, hashing."""

from __future__ import annotations

import asyncio
import logging
import secrets

import httpx
import pytest
from sqlalchemy import select

from api.app import create_app
from core.db import create_sessionmaker
from core.errors import Conflict
from core.keys import create_key, revoke_key
from core.models import ApiKey, KeyRole
from tests.conftest import Backend, TenantKeys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_create_tenant_returns_keys_once(
    client: httpx.AsyncClient, platform_key: str, backend: Backend
) -> None:
    r = await client.post(
        "/v1/tenants",
        headers=bearer(platform_key),
        json={"slug": f"acme-{secrets.token_hex(4)}", "name": "Acme"},
    )
    assert r.status_code == 201, r.text
    # A response that carries a key is kept by no cache.
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["tenant"]["name"] == "Acme" and body["tenant"]["status"] == "active"
    admin, product = body["admin_key"], body["product_key"]
    assert admin["role"] == "admin" and product["role"] == "product"
    assert admin["key"].startswith(admin["prefix"] + "_")
    # The secret works, and it is stored nowhere: only its prefix and a hash.
    r = await client.get("/v1/keys", headers=bearer(admin["key"]))
    assert r.status_code == 200 and admin["key"] not in r.text and '"key":' not in r.text
    async with create_sessionmaker(backend.engine)() as s:
        rows = list(await s.scalars(select(ApiKey).where(ApiKey.tenant_id == body["tenant"]["id"])))
    assert len(rows) == 2
    for row in rows:
        for value in vars(row).values():
            assert admin["key"] not in str(value) and product["key"] not in str(value)


async def test_slug_rules(client: httpx.AsyncClient, platform_key: str, tenant: TenantKeys) -> None:
    r = await client.post("/v1/tenants", headers=bearer(platform_key), json={"slug": tenant.slug})
    assert r.status_code == 409 and r.json()["error"]["code"] == "slug_taken"
    for bad in ("Upper", "-dash", "a_b", "x" * 64, "", "sp ace"):
        r = await client.post("/v1/tenants", headers=bearer(platform_key), json={"slug": bad})
        assert r.status_code == 422, bad
        assert "slug" in r.json()["error"]["message"]


async def test_list_get_patch_tenants(
    client: httpx.AsyncClient,
    platform_key: str,
    make_tenant,  # type: ignore[no-untyped-def]
) -> None:
    made = {(await make_tenant()).id for _ in range(3)}
    seen: set[str] = set()
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await client.get("/v1/tenants", headers=bearer(platform_key), params=params)).json()
        seen |= {t["id"] for t in page["data"]}
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert made <= seen
    one = next(iter(made))
    r = await client.patch(
        f"/v1/tenants/{one}", headers=bearer(platform_key), json={"name": "Renamed"}
    )
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    r = await client.get(f"/v1/tenants/{one}", headers=bearer(platform_key))
    assert r.json()["name"] == "Renamed"
    r = await client.patch(
        f"/v1/tenants/{one}", headers=bearer(platform_key), json={"status": "deleted"}
    )
    assert r.status_code == 422


async def test_suspended_tenant_is_refused_until_reactivated(
    client: httpx.AsyncClient, platform_key: str, tenant: TenantKeys
) -> None:
    fb = {"prompt": "p", "completion": "c", "rating": "up"}
    r = await client.patch(
        f"/v1/tenants/{tenant.id}", headers=bearer(platform_key), json={"status": "suspended"}
    )
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    r = await client.post("/v1/feedback", headers=tenant.auth(), json=fb)
    assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_suspended"
    await client.patch(
        f"/v1/tenants/{tenant.id}", headers=bearer(platform_key), json={"status": "active"}
    )
    assert (await client.post("/v1/feedback", headers=tenant.auth(), json=fb)).status_code == 201


async def test_key_lifecycle(client: httpx.AsyncClient, tenant: TenantKeys) -> None:
    r = await client.post(
        "/v1/keys", headers=tenant.auth("admin"), json={"role": "product", "name": "mobile app"}
    )
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    new = r.json()
    fb = {"prompt": "p", "completion": "c", "rating": "up"}
    assert (
        await client.post("/v1/feedback", headers=bearer(new["key"]), json=fb)
    ).status_code == 201
    listed = (await client.get("/v1/keys", headers=tenant.auth("admin"))).json()["data"]
    assert {k["id"] for k in listed} == {tenant.admin_key_id, tenant.product_key_id, new["id"]}
    r = await client.delete(f"/v1/keys/{new['id']}", headers=tenant.auth("admin"))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = await client.post("/v1/feedback", headers=bearer(new["key"]), json=fb)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    # Revoking twice is harmless; the last admin key cannot be revoked.
    assert (
        await client.delete(f"/v1/keys/{new['id']}", headers=tenant.auth("admin"))
    ).status_code == 200
    r = await client.delete(f"/v1/keys/{tenant.admin_key_id}", headers=tenant.auth("admin"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_admin_key"
    r = await client.post("/v1/keys", headers=tenant.auth("admin"), json={"role": "platform"})
    assert r.status_code == 422


async def test_two_admins_revoking_each_other_at_once_leave_one(
    backend: Backend, tenant: TenantKeys
) -> None:
    if backend.name != "postgres":
        pytest.skip("the row lock is PostgreSQL's; SQLite lets one writer at a time anyway")
    maker = create_sessionmaker(backend.engine)
    async with maker() as s:
        other = await create_key(s, tenant_id=tenant.id, role=KeyRole.admin)
        await s.commit()
    async with maker() as first, maker() as second:
        await revoke_key(first, tenant_id=tenant.id, key_id=other.row.id)  # not yet committed
        racing = asyncio.create_task(
            revoke_key(second, tenant_id=tenant.id, key_id=tenant.admin_key_id)
        )
        await asyncio.sleep(0.5)
        # Without the lock, the second count would not see the first revocation and both
        # would go through: a tenant with no admin key.
        assert not racing.done(), "the second revocation did not wait for the first"
        await first.commit()
        with pytest.raises(Conflict):
            await racing


async def test_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    r = await client.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_keys_never_reach_the_logs(
    client: httpx.AsyncClient, tenant: TenantKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await client.get("/v1/keys", headers=tenant.auth("admin"))
    await client.get("/v1/keys", headers=bearer(tenant.admin + "x"))
    await client.post("/v1/keys", headers=tenant.auth("admin"), json={"role": "product"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    secret_part = tenant.admin.split("_", 2)[2]
    assert secret_part not in text and tenant.product.split("_", 2)[2] not in text


async def test_dashboard_pages_cannot_be_framed_or_run_foreign_scripts(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/dashboard/login")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    static = await client.get("/dashboard/static/live.js")
    assert static.status_code == 200 and "content-security-policy" not in static.headers


async def test_errors_name_no_internal_address(
    backend: Backend, tenant: TenantKeys, caplog: pytest.LogCaptureFixture
) -> None:
    # Temporal's address is the operator's business: the client hears that orchestration is
    # down, the log says where.
    settings = backend.settings.model_copy(update={"temporal_address": "127.0.0.1:1"})
    app = create_app(settings, engine=backend.engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test"
    ) as c:
        with caplog.at_level(logging.WARNING, logger="api.orchestration"):
            r = await c.post("/v1/runs", headers=tenant.auth("admin"), json={})
    await app.state.backend.close()
    assert (r.status_code, r.json()["error"]["code"]) == (503, "orchestration_unavailable")
    assert "127.0.0.1:1" not in r.text and "Temporal" in r.json()["error"]["message"]
    assert "127.0.0.1:1" in caplog.text


async def test_a_nul_in_the_url_is_refused_not_a_500(
    client: httpx.AsyncClient, tenant: TenantKeys
) -> None:
    # PostgreSQL cannot compare text with NUL in it: the fuzzer found GET /v1/feedback?cursor=%00
    # answered 500 there.
    for url in (
        "/v1/feedback?cursor=%00&limit=5",
        "/v1/runs/run_%00x",
        "/v1/feedback?cursor=a%00b",
    ):
        r = await client.get(url, headers=tenant.auth("admin"))
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["code"] == "invalid_input"
