"""Cross-tenant attack matrix: tenant B's own, valid keys against tenant A's objects — run ids,
adapter version ids, serving names, key ids, interaction ids — in the path and in the body of
every tenant route. Each attempt must be refused exactly as if the object did not exist (same
status, same code, same message as for an id nobody has), leave A's object untouched, and be
logged with B's tenant id, the method and the path, never with a key.

tests/api/test_auth_matrix.py covers missing/wrong keys and roles; this module is the attacker
with a valid key. The matrix is checked against the OpenAPI document, so a new route with an id
in its path or body fails here until it is added.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api import dashboard
from api.app import create_app
from core import deployments
from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from core.ids import new_id
from core.models import ApiKey, Feedback, RunStatus, TrainingRun
from core.settings import ApiSettings
from serving import registry
from serving.names import serving_name
from tests.conftest import Backend, TenantKeys, dashboard_login

pytestmark = pytest.mark.reliability


@dataclass(frozen=True)
class Attack:
    """One request by tenant B naming one of tenant A's objects.

    ``path`` and ``body`` use ``{placeholders}`` filled from A's objects (and, for the control
    request, from fresh ids that nobody has).
    """

    method: str
    path: str
    role: str  # which of B's keys: "admin" or "product"
    body: dict[str, Any] | None = None
    status: int = 404
    codes: tuple[str, ...] = ("not_found",)
    via: str = "bearer"
    """How B authenticates: "bearer" (API key). Dashboard pages log in with a key and carry a
    session cookie: teach ``_send`` that way ("dashboard") when adding DASHBOARD_ATTACKS."""
    label: str = field(default="")

    def __str__(self) -> str:
        return self.label or f"{self.method} {self.path} {self.body or ''}".strip()


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON_API_ATTACKS: list[Attack] = [
    Attack("GET", "/v1/runs/{run_id}", "admin"),
    Attack("GET", "/v1/runs/{run_id}/events", "admin"),
    Attack("POST", "/v1/runs/{run_id}/cancel", "admin"),
    Attack("POST", "/v1/runs/{run_id}/approve", "admin"),
    Attack("POST", "/v1/runs/{run_id}/reject", "admin", body={"reason": "not yours"}),
    Attack("POST", "/v1/adapters/{version_id}/promote", "admin"),
    Attack("POST", "/v1/adapters/{serving_name}/promote", "admin", label="promote by serving name"),
    Attack(
        "POST",
        "/v1/deployment/canary",
        "admin",
        body={"version_id": "{version_id}", "fraction": 0.2},
        label="canary of A's version",
    ),
    Attack("DELETE", "/v1/keys/{key_id}", "admin"),
    Attack("DELETE", "/v1/keys/{admin_key_id}", "admin", label="revoke A's admin key"),
    Attack("DELETE", "/v1/users/{user_id}/data", "admin", label="erase A's end user"),
    *(
        Attack("POST", route, "product", body={**CHAT, "model": ref}, codes=("model_not_found",))
        for route in ("/v1/chat/completions",)
        for ref in ("{version_id}", "{serving_name}")
    ),
    *(
        Attack(
            "POST",
            "/v1/completions",
            "product",
            body={"prompt": "hi", "max_tokens": 2, "model": ref},
            codes=("model_not_found",),
        )
        for ref in ("{version_id}", "{serving_name}")
    ),
    # Feedback answers 422 (a batch points at the bad item by index), but with the same code and
    # message for another tenant's interaction as for one that never existed.
    Attack(
        "POST",
        "/v1/feedback",
        "product",
        body={"interaction_id": "{interaction_id}", "rating": "up"},
        status=422,
        codes=("unknown_interaction",),
    ),
    Attack(
        "POST",
        "/v1/feedback",
        "product",
        body={"items": [{"interaction_id": "{interaction_id}", "rating": "down"}]},
        status=422,
        codes=("unknown_interaction",),
        label="feedback batch naming A's interaction",
    ),
]

# Dashboard pages and forms that name one object — a run, an adapter version, a key: B's dashboard
# session (logged in with B's admin key, forms carrying B's CSRF token) against A's ids, refused
# with the same "not found" page as for an id nobody has.
DASHBOARD_ATTACKS: list[Attack] = (
    [
        Attack("GET", path, "admin", via="dashboard")
        for path in ("/dashboard/runs/{run_id}", "/dashboard/runs/{run_id}/live")
    ]
    + [
        Attack("POST", path, "admin", via="dashboard")
        for path in (
            "/dashboard/runs/{run_id}/cancel",
            "/dashboard/runs/{run_id}/approve",
            "/dashboard/runs/{run_id}/reject",
            "/dashboard/adapters/{version_id}/promote",
            "/dashboard/adapters/{serving_name}/promote",
            "/dashboard/settings/keys/{key_id}/revoke",
            "/dashboard/settings/keys/{admin_key_id}/revoke",
        )
    ]
    + [
        Attack(
            "POST",
            "/dashboard/deployment/canary",
            "admin",
            via="dashboard",
            body={"version_id": "{version_id}", "percent": "20"},
            label="dashboard canary of A's version",
        )
    ]
)
REFUSAL_LOGGERS = ("api.errors", "api.dashboard.pages")

# Path parameters a tenant key can never use: platform routes answer 403 to any tenant key before
# looking anything up (tests/api/test_auth_matrix.py checks that for every such route).
PLATFORM_ONLY_PARAMS = {"tenant_id"}
# Request-body fields that name an object; a route taking one must have an attack with it.
BODY_REFERENCES = {"model", "interaction_id", "version_id", "run_id", "key_id", "adapter_id"}


async def _objects_of(
    backend: Backend, client: httpx.AsyncClient, a: TenantKeys, tmp: Path
) -> dict[str, str]:
    (tmp / "adapter_config.json").write_text('{"r": 4}')
    (tmp / "adapter_model.safetensors").write_bytes(b"weights of tenant A " + tmp.name.encode())
    async with create_sessionmaker(backend.engine)() as s:
        version = await registry.register_adapter(
            s, ArtifactStore(tmp / "store"), tenant_id=a.id, adapter_dir=tmp, base_model="x"
        )
        # A run in flight: a cancel that got through would change it.
        run = TrainingRun(tenant_id=a.id, status=RunStatus.running)
        s.add(run)
        await s.commit()
    r = await client.post("/v1/chat/completions", headers=a.auth(), json={**CHAT, "model": "base"})
    assert r.status_code == 200, r.text
    user_id = new_id("usr")  # an end user of A's, with feedback to erase
    fb = {"prompt": "p", "completion": "c", "rating": "up", "user_id": user_id}
    assert (await client.post("/v1/feedback", headers=a.auth(), json=fb)).status_code == 201
    return {
        "user_id": user_id,
        "run_id": run.id,
        "version_id": version.id,
        "serving_name": version.serving_name,
        "key_id": a.product_key_id,
        "admin_key_id": a.admin_key_id,
        "interaction_id": r.json()["interaction_id"],
    }


def _nobodys(ids: dict[str, str]) -> dict[str, str]:
    """Ids of the same shape that no tenant has: the control for "exactly as if missing"."""
    out = {k: new_id(v.split("_", 1)[0]) for k, v in ids.items() if k != "serving_name"}
    out["serving_name"] = serving_name(new_id("ten"), "0" * 64)
    return out


def _fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


async def _send(
    client: httpx.AsyncClient, attack: Attack, attacker: TenantKeys, ids: dict[str, str]
) -> tuple[str, httpx.Response]:
    path = _fill(attack.path, ids)
    if attack.via == "dashboard":
        form = _fill(attack.body, ids) if attack.body is not None else {}
        return path, await _send_from_dashboard(client, attack, attacker, path, form)
    assert attack.via == "bearer", f"teach _send to authenticate via {attack.via!r}"
    r = await client.request(
        attack.method,
        path,
        headers=attacker.auth(attack.role),
        json=_fill(attack.body, ids) if attack.body is not None else None,
    )
    return path, r


async def _send_from_dashboard(
    client: httpx.AsyncClient, attack: Attack, attacker: TenantKeys, path: str, form: Any
) -> httpx.Response:
    """A browser-like session of the attacker's own: its cookie, its CSRF token."""
    async with httpx.AsyncClient(transport=client._transport, base_url=client.base_url) as c:
        login = await dashboard_login(c, attacker.admin)
        assert login.status_code == 303, login.text
        home = await c.get("/dashboard")
        token = re.search(r'name="csrf_token" value="([^"]+)"', home.text)
        assert token, "no CSRF token on the dashboard"
        data = {"csrf_token": token.group(1), **form} if attack.method == "POST" else None
        return await c.request(attack.method, path, data=data)


def _openapi() -> dict[str, Any]:
    doc: dict[str, Any] = create_app(ApiSettings(data_dir="/nonexistent")).openapi()
    return doc


def _body_fields(doc: dict[str, Any], schema: dict[str, Any], seen: set[str]) -> set[str]:
    """Every property name reachable in a request-body schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return set()
        seen.add(name)
        schema = doc["components"]["schemas"][name]
    names = set(schema.get("properties", {}))
    for sub in schema.get("properties", {}).values():
        names |= _body_fields(doc, sub, seen)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            names |= _body_fields(doc, sub, seen)
    if "items" in schema:
        names |= _body_fields(doc, schema["items"], seen)
    return names


def test_the_matrix_covers_every_route_that_names_an_object() -> None:
    doc = _openapi()
    attacked = {(a.method, a.path) for a in JSON_API_ATTACKS + DASHBOARD_ATTACKS}
    attacked_bodies = {
        (a.method, a.path, k)
        for a in JSON_API_ATTACKS
        for k in _body_fields_of_attack(a.body)
        if k in BODY_REFERENCES
    }
    missing = []
    for path, ops in doc["paths"].items():
        params = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            m = method.upper()
            if params - PLATFORM_ONLY_PARAMS:
                assert params.isdisjoint(PLATFORM_ONLY_PARAMS), (m, path)
                # Any attack on this route, whichever of A's ids fills it.
                if not any(am == m and _same_route(ap, path) for am, ap in attacked):
                    missing.append((m, path))
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            for ref in _body_fields(doc, body["schema"], set()) & BODY_REFERENCES:
                if (m, path, ref) not in attacked_bodies:
                    missing.append((m, path, ref))
    # The dashboard is not in the OpenAPI document: its routes come from its router.
    assert dashboard.router.routes
    for route in dashboard.router.routes:
        path = getattr(route, "path", "")
        params = set(re.findall(r"\{(\w+)\}", path))  # the catch-all {rest:path} names nothing
        if not path.startswith("/dashboard/") or not params:
            continue
        for m in getattr(route, "methods", set()) - {"HEAD"}:
            if not any(am == m and _same_route(ap, path) for am, ap in attacked):
                missing.append((m, path))
    assert not missing, f"add these to JSON_API_ATTACKS / DASHBOARD_ATTACKS: {missing}"


def _body_fields_of_attack(body: Any) -> set[str]:
    if isinstance(body, dict):
        return set(body) | {k for v in body.values() for k in _body_fields_of_attack(v)}
    if isinstance(body, list):
        return {k for v in body for k in _body_fields_of_attack(v)}
    return set()


def _same_route(attack_path: str, route: str) -> bool:
    pattern = re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(route))
    return re.fullmatch(pattern, attack_path) is not None


@pytest.mark.parametrize("attack", JSON_API_ATTACKS + DASHBOARD_ATTACKS, ids=str)
async def test_tenant_b_cannot_reach_tenant_a(
    client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    attack: Attack,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    ids = await _objects_of(backend, client, a, tmp_path)
    for name in REFUSAL_LOGGERS:
        caplog.set_level(logging.WARNING, logger=name)
    caplog.clear()

    def answer(r: httpx.Response) -> Any:
        # The JSON API's error envelope, or the dashboard's error page (a person reads that).
        if attack.via == "dashboard":
            assert "<html" in r.text and "Not found" in r.text, r.text
            return r.text
        error = r.json()["error"]
        assert error["code"] in attack.codes, error
        return error

    path, r = await _send(client, attack, b, ids)
    assert r.status_code == attack.status, (str(attack), r.status_code, r.text)
    error = answer(r)

    # Exactly as if the object did not exist: the same answer for an id that nobody has.
    nobody = _nobodys(ids)
    _, control = await _send(client, attack, b, nobody)
    assert control.status_code == r.status_code
    control_error = answer(control)

    def scrub(e: Any, known: dict[str, str]) -> str:
        text = e if isinstance(e, str) else repr(e)
        for value in known.values():
            text = text.replace(value, "<id>")
        # The dashboard page carries the session's own CSRF token: not part of the answer.
        return re.sub(r'name="csrf_token" value="[^"]+"', "", text)

    assert scrub(error, ids) == scrub(control_error, nobody), (error, control_error)

    # Logged: who (B's tenant), what (method and path); never a key.
    refusals = [
        rec.getMessage()
        for rec in caplog.records
        if rec.name in REFUSAL_LOGGERS and rec.levelno == logging.WARNING
    ]
    assert any(b.id in msg and attack.method in msg and path in msg for msg in refusals), refusals
    for secret in (a.admin, a.product, b.admin, b.product):
        assert secret not in caplog.text

    # A's objects are untouched.
    async with create_sessionmaker(backend.engine)() as s:
        run = await s.get(TrainingRun, ids["run_id"])
        assert run is not None and run.status is RunStatus.running
        for key_id in (ids["key_id"], ids["admin_key_id"]):
            key = await s.get(ApiKey, key_id)
            assert key is not None and key.revoked_at is None
        assert await deployments.live_version_id(s, tenant_id=a.id) is None
        assert await s.scalar(select(Feedback.id).where(Feedback.user_id == ids["user_id"]))
    r = await client.get("/v1/adapters", headers=a.auth("admin"))
    assert [v["status"] for v in r.json()["data"]] == ["candidate"]
