"""Table-driven security checks over every route in the OpenAPI document, so a new route is
covered the day it is added: 401 without a valid key, 403 for the wrong role, 404 for another
tenant's objects, and list routes that never show another tenant's data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from core.models import Feedback, RunStatus, TrainingRun
from core.settings import ApiSettings
from serving import registry
from tests.conftest import Backend, TenantKeys

# The Stripe webhook is authenticated by its signature (tests/billing), not by an API key.
PUBLIC = {"/healthz", "/readyz", "/v1/billing/stripe/webhook"}


def _routes() -> list[tuple[str, str, str | None]]:
    """(method, path, role) from the OpenAPI document; the role is the security scope."""
    doc = create_app(ApiSettings(data_dir="/nonexistent")).openapi()
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            scopes = {s for req in op.get("security", []) for s in req.get("HTTPBearer", [])}
            assert len(scopes) <= 1, f"{path} mixes roles {scopes}"
            out.append((method.upper(), path, scopes.pop() if scopes else None))
    return out


ROUTES = _routes()
PROTECTED = [r for r in ROUTES if r[1] not in PUBLIC]


def test_every_api_route_requires_a_role() -> None:
    assert len(PROTECTED) >= 10  # the walk found the routes at all
    unguarded = [(m, p) for m, p, role in PROTECTED if role is None]
    assert not unguarded, f"routes without an auth dependency: {unguarded}"


async def _objects_of(backend: Backend, a: TenantKeys, tmp: Path) -> dict[str, str]:
    """Tenant A's object for every path parameter the API has."""
    (tmp / "adapter_config.json").write_text('{"r": 4}')
    (tmp / "adapter_model.safetensors").write_bytes(b"weights of tenant A")
    async with create_sessionmaker(backend.engine)() as s:
        version = await registry.register_adapter(
            s, ArtifactStore(tmp / "store"), tenant_id=a.id, adapter_dir=tmp, base_model="x"
        )
        run = TrainingRun(tenant_id=a.id, status=RunStatus.succeeded, reason="done")
        s.add(run)
        # An end user of A's with feedback (what DELETE /v1/users/{user_id}/data erases).
        s.add(Feedback(tenant_id=a.id, prompt="p", completion="c", rating=1, user_id="a-user"))
        await s.commit()
    return {
        "user_id": "a-user",
        "tenant_id": a.id,
        "key_id": a.product_key_id,
        "version_id": version.id,
        "run_id": run.id,
    }


def _fill(path: str, ids: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in ids, f"add tenant A's object for path parameter {{{name}}} to the matrix"
        return ids[name]

    return re.sub(r"\{(\w+)\}", sub, path)


async def _call(
    client: httpx.AsyncClient, method: str, url: str, key: str | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    # An empty JSON object: a body that gets as far as authorization, never a valid write.
    body: Any = {} if method in ("POST", "PUT", "PATCH") else None
    return await client.request(method, url, headers=headers, json=body)


@pytest.mark.parametrize(("method", "path", "role"), PROTECTED, ids=lambda v: str(v))
async def test_unauthenticated_and_wrong_role(
    client: httpx.AsyncClient,
    make_tenant,
    platform_key: str,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
    method: str,
    path: str,
    role: str,
) -> None:
    a: TenantKeys = await make_tenant()
    url = _fill(path, await _objects_of(backend, a, tmp_path))
    revoked = (
        await client.post("/v1/keys", headers=a.auth("admin"), json={"role": "admin"})
    ).json()
    await client.delete(f"/v1/keys/{revoked['id']}", headers=a.auth("admin"))

    for key in (None, "", "tl_nope", "tl_p0000000000_" + "x" * 43, "Basic abc", revoked["key"]):
        r = await _call(client, method, url, key)
        assert r.status_code == 401, (method, url, key, r.text)
        assert r.json()["error"]["code"] == "unauthenticated"
        assert r.headers["www-authenticate"] == "Bearer"

    keys = {"platform": platform_key, "admin": a.admin, "product": a.product}
    allowed = {"platform": {"platform"}, "admin": {"admin"}, "product": {"product", "admin"}}[role]
    for who, key in keys.items():
        if who in allowed:
            continue
        r = await _call(client, method, url, key)
        assert r.status_code == 403, (method, url, who, r.text)
        assert r.json()["error"]["code"] == "permission_denied"


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [r for r in PROTECTED if "{" in r[1] and r[2] != "platform"],
    ids=lambda v: str(v),
)
async def test_other_tenants_objects_are_not_found(
    client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
    method: str,
    path: str,
    role: str,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    objects = await _objects_of(backend, a, tmp_path)
    url = _fill(path, objects)
    r = await _call(client, method, url, b.admin if role == "admin" else b.product)
    assert r.status_code == 404, (method, url, r.text)
    assert r.json()["error"]["code"] == "not_found"
    # ...and tenant A's objects are untouched.
    keys = (await client.get("/v1/keys", headers=a.auth("admin"))).json()["data"]
    assert all(k["revoked_at"] is None for k in keys)
    versions = (await client.get("/v1/adapters", headers=a.auth("admin"))).json()["data"]
    assert [(v["id"], v["status"]) for v in versions] == [(objects["version_id"], "candidate")]


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [r for r in PROTECTED if r[0] == "GET" and "{" not in r[1] and r[2] != "platform"],
    ids=lambda v: str(v),
)
async def test_lists_never_show_another_tenants_data(
    client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
    method: str,
    path: str,
    role: str,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    version = (await _objects_of(backend, a, tmp_path))["version_id"]
    r = await client.post(
        "/v1/feedback",
        headers=a.auth(),
        json={
            "prompt": "secret prompt of A",
            "completion": "c",
            "rating": "up",
            "user_id": "alice",
        },
    )
    fb = r.json()["id"]
    r = await client.get(path, headers={"Authorization": f"Bearer {b.admin}"})
    assert r.status_code == 200, r.text
    markers = (fb, a.id, a.admin_key_id, a.product_key_id, "secret prompt of A", "alice", version)
    for marker in markers:
        assert marker not in r.text, (path, marker)


async def test_platform_routes_on_unknown_tenant_are_404(
    client: httpx.AsyncClient, platform_key: str
) -> None:
    for method in ("GET", "PATCH"):
        r = await _call(client, method, "/v1/tenants/ten_missing", platform_key)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
