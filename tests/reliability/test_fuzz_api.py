"""Fuzz the API from its own OpenAPI document with schemathesis, in process over ASGI.

Every operation in the document is fuzzed — the billing routes and anything added later
included — with schema-valid (positive) and schema-invalid (negative) requests. Each generated
request is sent twice: with a valid key of the role the route asks for, and with an invalid one
(none, garbage, a well-formed unknown key, or a valid key of the wrong role). The checks: no 5xx,
every status code is one the document lists for the operation, responses match their documented
schema and content type, and every error is the documented envelope
``{"error": {"code", "message", "details"}}``.

Nothing is excluded. The app is configured as in production: a real Temporal dev server (so
``POST /v1/runs`` really starts workflows and ``PUT /v1/policy`` really creates schedules), a
Stripe webhook secret (so the webhook checks signatures), the tiny model on the local backend.

The requests go through one event loop in a helper thread (hypothesis drives a plain function;
the app's engine and tiny-model backend live in that loop for the whole test).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis import checks as checks_module

from api.app import create_app
from core.db import create_sessionmaker
from core.keys import create_key
from core.models import KeyRole, RunStatus, TrainingRun
from serving import registry
from tests.conftest import Backend, free_port
from tests.serving.adapters import make_adapter
from workflows.devserver import start_dev_server, stop

T = TypeVar("T")
pytestmark = pytest.mark.reliability

# Per operation and generation mode: 27 operations x 2 modes x this x 2 requests; about 20 s per
# database backend on two cores at the default (inference on the tiny model dominates).
MAX_EXAMPLES = int(os.environ.get("TUNELOOP_FUZZ_EXAMPLES", "20"))
CHECKS = [
    checks_module.not_a_server_error,
    checks_module.status_code_conformance,
    checks_module.content_type_conformance,
    checks_module.response_schema_conformance,
]


class LoopThread:
    """An asyncio loop in a daemon thread: run coroutines on it from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 120) -> T:
        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Target:
    loop: LoopThread
    http: httpx.AsyncClient
    keys: dict[str, str]
    """role -> a valid key: platform, admin, product."""
    ids: dict[str, str]
    """Objects that exist: positive cases aim at them half the time (see ``_aim``)."""
    doc: dict[str, Any]
    sent: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, set[int]] = field(default_factory=dict)


@pytest.fixture
def target(backend: Backend, tmp_path: Path) -> Iterator[Target]:
    loop = LoopThread()
    # A dev server of its own that no worker polls: fuzzed runs (with fuzzed policies) are
    # started for real and stay queued, and never take another test's worker.
    temporal_port = free_port()
    temporal = start_dev_server(port=temporal_port, ui_port=None, db_file=None)

    async def setup() -> tuple[Any, httpx.AsyncClient, dict[str, str], dict[str, str]]:
        # The app builds its own engine and tiny-model backend inside this loop.
        app = create_app(
            backend.settings.model_copy(
                update={
                    "temporal_address": f"127.0.0.1:{temporal_port}",
                    "stripe_webhook_secret": "whsec_fuzz",
                }
            )
        )
        async with create_sessionmaker(app.state.engine)() as s:
            platform = await create_key(s, tenant_id=None, role=KeyRole.platform, name="fuzz")
            await s.commit()
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tuneloop.test", timeout=60
        )
        auth = {"Authorization": f"Bearer {platform.secret}"}
        made, victim = [
            (
                await http.post(
                    "/v1/tenants", json={"slug": f"fuzz-{n}-{time.time_ns()}"}, headers=auth
                )
            ).json()
            for n in range(2)
        ]
        keys = {
            "platform": platform.secret,
            "admin": made["admin_key"]["key"],
            "product": made["product_key"]["key"],
        }
        tenant_id = made["tenant"]["id"]
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        spare = (await http.post("/v1/keys", json={"role": "product"}, headers=admin)).json()
        adapter = make_adapter(backend.settings.data_dir, tmp_path / "adapter", seed=5)
        async with create_sessionmaker(app.state.engine)() as s:
            version = await registry.register_adapter(
                s,
                app.state.store,
                tenant_id=tenant_id,
                adapter_dir=adapter,
                base_model="tiny-random",
            )
            run = TrainingRun(tenant_id=tenant_id, status=RunStatus.succeeded, reason="fuzz")
            s.add(run)
            await s.commit()
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "base",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            headers={"Authorization": f"Bearer {keys['product']}"},
        )
        ids = {
            # Platform routes aim at a second tenant: a fuzzed PATCH may suspend it.
            "tenant_id": victim["tenant"]["id"],
            "key_id": spare["id"],
            "version_id": version.id,
            "run_id": run.id,
            "interaction_id": r.json()["interaction_id"],
        }
        return app, http, keys, ids

    app, http, keys, ids = loop.run(setup())
    try:
        yield Target(loop, http, keys, ids, app.openapi())
    finally:

        async def teardown() -> None:
            await http.aclose()
            await app.state.backend.close()
            await app.state.engine.dispose()

        loop.run(teardown())
        loop.close()
        stop(temporal)


def _role(operation: Any) -> str | None:
    for requirement in operation.definition.raw.get("security", []):
        for scopes in requirement.values():
            if scopes:
                return str(scopes[0])
    return None


def _aim(case: Any, ids: dict[str, str]) -> None:
    """Point a generated request at objects that exist, keeping everything else it generated:
    random ids and model names only ever reach the 404 branch, real ones reach the code behind
    it (inference on the tiny model, promotion, cancel, revoke, feedback on an interaction)."""
    for name in list(case.path_parameters or {}):
        if name in ids:
            case.path_parameters[name] = ids[name]
    body = case.body
    items = body.get("items") if isinstance(body, dict) else None
    for item in [body, *(items if isinstance(items, list) else [])]:
        if not isinstance(item, dict):
            continue
        if "model" in item:
            item["model"] = ("default", "base", ids["version_id"])[len(str(item["model"])) % 3]
        if isinstance(item.get("interaction_id"), str):
            item["interaction_id"] = ids["interaction_id"]


def _has_inputs(operation: Any) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


def _invalid_keys(role: str | None, keys: dict[str, str]) -> list[str | None]:
    wrong_role = {"platform": "admin", "admin": "product", "product": "platform"}
    out: list[str | None] = [None, "not-a-key", "tl_p0000000000_" + "x" * 43]
    if role is not None:
        out.append(keys[wrong_role[role]])
    return out


def _send(target: Target, case: Any, key: str | None) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url="http://tuneloop.test")
    headers = {k: v for k, v in kwargs["headers"].items() if k.lower() != "authorization"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": headers,
        "params": kwargs.get("params"),
    }
    if "json" in kwargs:
        request["json"] = kwargs["json"]
    elif "data" in kwargs:
        request["content"] = kwargs["data"]
    return target.loop.run(target.http.request(**request))


def _describe(exc: BaseException) -> str:
    """The message of each distinct failure (hypothesis groups them)."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _check_envelope(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error


def _fuzz(target: Target, operation: Any, mode: GenerationMode) -> None:
    role = _role(operation)
    invalid = _invalid_keys(role, target.keys)
    valid = target.keys[role] if role is not None else None
    rotation = iter(range(10**9))

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        n = next(rotation)
        if mode is GenerationMode.POSITIVE and n % 2 == 0:
            _aim(case, target.ids)
        bad = invalid[n % len(invalid)]
        for key in (valid, bad):
            response = _send(target, case, key)
            target.sent[operation.label] = target.sent.get(operation.label, 0) + 1
            target.statuses.setdefault(operation.label, set()).add(response.status_code)
            # The body says what broke; schemathesis' own report would only say "Server error".
            assert response.status_code < 500, (response.status_code, response.text[:500])
            case.validate_response(response, checks=CHECKS)
            _check_envelope(response)

    fuzz()


def test_fuzz_every_operation(target: Target) -> None:
    schema = schemathesis.openapi.from_dict(target.doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [o.label for o in operations]
    failures: list[str] = []
    started = time.monotonic()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(target, operation, mode)
            except Unsatisfiable:
                # An operation without parameters or body (e.g. GET /healthz) has no invalid
                # request to generate; its positive run above covers it.
                assert mode is GenerationMode.NEGATIVE and not _has_inputs(operation)
            # Collect every operation's failure (schemathesis raises a group), then report.
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} [{mode.value}]: {_describe(exc)}"[:4000])
    elapsed = time.monotonic() - started
    print(f"fuzzed {sum(target.sent.values())} requests over {len(operations)} operations "
          f"in {elapsed:.0f}s; statuses: {dict(sorted(target.statuses.items()))}")  # fmt: skip
    assert set(target.sent) == {o.label for o in operations}  # every operation got requests
    # The valid keys got through: most operations answered some request with a 2xx (the rest
    # need ids the fuzzer cannot guess, or a signed Stripe event).
    succeeded = [op for op, codes in target.statuses.items() if any(c < 300 for c in codes)]
    assert len(succeeded) >= len(operations) * 2 // 3, target.statuses
    assert not failures, "\n\n".join(failures)
