"""The local backend when an adapter cannot be served (per-tenant fallback policy, isolation
inside a micro-batch) and when the registry retires a version (it is unloaded)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from core import deployments
from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from core.errors import Unavailable
from core.models import Interaction, RunStatus, TrainingRun
from serving import registry
from serving.gateway import AdapterPlacement
from serving.local import LocalBackend
from serving.types import FALLBACK, AdapterRef, Generation, GenerationRequest, Served
from tests.conftest import Backend, TenantKeys
from tests.serving.adapters import make_adapter
from workflows.activities import PersonalizationActivities
from workflows.contracts import CanaryInput, PromoteInput

PROMPT = [{"role": "user", "content": "tell me about the weather"}]


def engine_of(client: httpx.AsyncClient) -> LocalBackend:
    backend: LocalBackend = client._transport.app.state.backend  # type: ignore[attr-defined]
    return backend


async def register(backend: Backend, tenant_id: str, adapter: Path) -> tuple[str, AdapterRef]:
    """Register ``adapter`` for the tenant: (version id, what the backend loads)."""
    store = ArtifactStore(backend.settings.data_dir / "artifacts")
    async with create_sessionmaker(backend.engine)() as s:
        version = await registry.register_adapter(
            s, store, tenant_id=tenant_id, adapter_dir=adapter, base_model="tiny-random"
        )
    return version.id, AdapterRef(version.serving_name, store.path(version.uri))


def corrupt(ref: AdapterRef) -> None:
    """Weights that are not a safetensors file: the adapter can never load."""
    (ref.path / "adapter_model.safetensors").write_bytes(b"\x00not safetensors")


def misfit(ref: AdapterRef) -> None:
    """Readable files whose weights do not fit their config (rank 4 weights, rank 8 config):
    PEFT injects the adapter's layers and only then fails."""
    config = ref.path / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 8}))


def chat(ref: AdapterRef | None, *, fallback: bool = False) -> GenerationRequest:
    return GenerationRequest(
        adapter=ref, messages=PROMPT, max_tokens=12, temperature=0, fallback_to_base=fallback
    )


@pytest.fixture
def fresh_adapters(tmp_path: Path, backend: Backend) -> Callable[[int], Path]:
    """Adapters with weights no other test uses: new serving names, never loaded before."""

    def make(seed: int) -> Path:
        return make_adapter(backend.settings.data_dir, tmp_path / f"s{seed}", seed=seed)

    return make


async def test_a_broken_adapter_fails_only_its_own_requests_in_a_batch(
    client: httpx.AsyncClient,
    make_tenant: Callable[[], Awaitable[TenantKeys]],
    backend: Backend,
    fresh_adapters: Callable[[int], Path],
) -> None:
    engine = engine_of(client)
    good_tenant, broken_tenant = await make_tenant(), await make_tenant()
    _, good = await register(backend, good_tenant.id, fresh_adapters(101))
    _, broken = await register(backend, broken_tenant.id, fresh_adapters(102))
    _, unfit = await register(backend, broken_tenant.id, fresh_adapters(103))
    corrupt(broken)
    misfit(unfit)
    alone_good = await engine.generate(chat(good))
    alone_base = await engine.generate(chat(None))
    assert alone_good.choices != alone_base.choices  # the adapter is applied

    # Two tenants in one generate call: B's adapters fail (corrupt, misfit); A is unaffected.
    requests = [
        chat(good),
        chat(broken),
        chat(broken, fallback=True),
        chat(unfit),
        chat(unfit, fallback=True),
        chat(None),
    ]
    before = engine.batches_run
    out = await asyncio.gather(*(engine.generate(r) for r in requests), return_exceptions=True)
    assert engine.batches_run - before == 1
    answer_good, no_fallback, fallback, no_fallback_unfit, fallback_unfit, base = out
    assert isinstance(answer_good, Generation) and answer_good == alone_good
    for refused in (no_fallback, no_fallback_unfit):
        assert isinstance(refused, Unavailable)
        assert refused.code == "adapter_unavailable" and refused.status == 503
    for fell_back in (fallback, fallback_unfit):
        assert isinstance(fell_back, Generation) and fell_back.served_by == FALLBACK
        assert fell_back.choices == alone_base.choices
    assert base == alone_base
    # The half-loaded misfit left nothing behind: base and A's adapter still answer the same.
    assert unfit.serving_name not in engine.loaded_adapters
    assert await engine.generate(chat(None)) == alone_base
    assert await engine.generate(chat(good)) == alone_good

    # A streamed fallback says so before its first piece of text.
    pieces = [p async for p in engine.stream(chat(broken, fallback=True))]
    assert pieces[0] == Served(FALLBACK) and isinstance(pieces[-1], Generation)
    assert "".join(p for p in pieces if isinstance(p, str)) == alone_base.choices[0].text


async def test_a_misfit_first_adapter_leaves_the_base_model_intact(
    backend: Backend, tenant: TenantKeys, fresh_adapters: Callable[[int], Path]
) -> None:
    """The first adapter wraps the bare base model; if it fails half-way, the model that PEFT
    injected into is dropped and loaded again, and the batch's other adapters still load."""
    _, unfit = await register(backend, tenant.id, fresh_adapters(109))
    _, good = await register(backend, tenant.id, fresh_adapters(110))
    misfit(unfit)
    engine = LocalBackend(base_model="tiny-random", data_dir=backend.settings.data_dir)
    try:
        base = await engine.generate(chat(None))
        out = await asyncio.gather(
            engine.generate(chat(unfit, fallback=True)), engine.generate(chat(good))
        )
        assert out[0].served_by == FALLBACK and out[0].choices == base.choices
        assert out[1].served_by == good.serving_name and out[1].choices != base.choices
        assert engine.loaded_adapters == [good.serving_name]
        assert await engine.generate(chat(None)) == base
    finally:
        await engine.close()


async def test_an_engine_whose_last_adapter_was_unloaded_serves_the_next_one(
    backend: Backend, tenant: TenantKeys, fresh_adapters: Callable[[int], Path]
) -> None:
    """Unloading the only loaded adapter (a tenant's version retired on an engine that served
    nothing else) leaves PEFT's active adapter naming it; the next adapter must still serve,
    preloaded or asked for, and answer as it does on an engine that never saw the first."""
    _, first = await register(backend, tenant.id, fresh_adapters(117))
    _, second = await register(backend, tenant.id, fresh_adapters(118))
    engine = LocalBackend(base_model="tiny-random", data_dir=backend.settings.data_dir)
    fresh = LocalBackend(base_model="tiny-random", data_dir=backend.settings.data_dir)
    try:
        expected = await fresh.generate(chat(second))
        base = await fresh.generate(chat(None))
        for load_first in (False, True):
            await engine.load(first)
            await engine.generate(chat(first))
            await engine.unload(first.serving_name)
            await engine.unload(second.serving_name)
            assert engine.loaded_adapters == []
            assert await engine.generate(chat(None)) == base
            if load_first:
                await engine.load(second)
            assert await engine.generate(chat(second)) == expected
    finally:
        await engine.close()
        await fresh.close()


async def test_a_broken_adapter_falls_back_only_where_the_tenant_policy_allows(
    client: httpx.AsyncClient,
    make_tenant: Callable[[], Awaitable[TenantKeys]],
    backend: Backend,
    fresh_adapters: Callable[[int], Path],
) -> None:
    allows, refuses = await make_tenant(), await make_tenant()
    r = await client.put(
        "/v1/policy", headers=allows.auth("admin"), json={"fallback_to_base": True}
    )
    assert r.status_code == 200 and r.json()["fallback_to_base"] is True
    for tenant, seed in ((allows, 104), (refuses, 105)):
        vid, ref = await register(backend, tenant.id, fresh_adapters(seed))
        corrupt(ref)
        r = await client.post(f"/v1/adapters/{vid}/promote", headers=tenant.auth("admin"))
        assert r.status_code == 200
    body = {"model": "default", "messages": PROMPT, "max_tokens": 8, "temperature": 0}
    base = await client.post(
        "/v1/chat/completions", headers=allows.auth(), json=body | {"model": "base"}
    )
    assert base.headers["x-served-by"] == "base"

    r = await client.post("/v1/chat/completions", headers=allows.auth(), json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == answer["served_by"] == r.headers["x-served-by"] == FALLBACK
    assert answer["choices"][0]["message"] == base.json()["choices"][0]["message"]
    async with client.stream(
        "POST", "/v1/chat/completions", headers=allows.auth(), json=body | {"stream": True}
    ) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-served-by"] == FALLBACK
        events = [
            json.loads(line.removeprefix("data: "))
            for line in [line async for line in streamed.aiter_lines()]
            if line.startswith("data: {")
        ]
    assert {e["model"] for e in events} == {e["served_by"] for e in events} == {FALLBACK}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == answer["choices"][0]["message"]["content"]
    async with create_sessionmaker(backend.engine)() as s:
        for interaction_id in (answer["interaction_id"], events[0]["interaction_id"]):
            row = await s.get(Interaction, interaction_id)
            assert row is not None and row.model == FALLBACK and row.adapter_version_id is None

    # The other tenant's policy (the default) does not allow it: 503, streaming included.
    for stream in (False, True):
        r = await client.post(
            "/v1/chat/completions", headers=refuses.auth(), json=body | {"stream": stream}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable"


async def test_retired_versions_are_unloaded_and_load_again_on_request(
    client: httpx.AsyncClient,
    tenant: TenantKeys,
    backend: Backend,
    fresh_adapters: Callable[[int], Path],
) -> None:
    engine = engine_of(client)
    placement = client._transport.app.state.placement  # type: ignore[attr-defined]
    (v1, a1), (v2, a2), (v3, a3) = [
        await register(backend, tenant.id, fresh_adapters(seed)) for seed in (106, 107, 108)
    ]
    admin = tenant.auth("admin")

    async def ask(model: str = "default") -> str:
        body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0}
        r = await client.post("/v1/chat/completions", headers=tenant.auth(), json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    async def loaded() -> set[str]:
        await placement.drain()  # the unloads run in the background
        return set(engine.loaded_adapters) & {a1.serving_name, a2.serving_name, a3.serving_name}

    # Promotion through the API loads the version before ``default`` points at it.
    await client.post(f"/v1/adapters/{v1}/promote", headers=admin)
    assert await loaded() == {a1.serving_name}
    first = await ask()
    assert await loaded() == {a1.serving_name}
    # ... and unloads the version it replaced at once.
    assert (await client.post(f"/v1/adapters/{v2}/promote", headers=admin)).status_code == 200
    assert await loaded() == {a2.serving_name}
    second = await ask()
    assert await loaded() == {a2.serving_name}
    # Asked for by id, a retired version loads again (and answers as it did).
    assert await ask(v1) == first
    assert await loaded() == {a1.serving_name, a2.serving_name}
    # Rollback through the API unloads the version rolled back.
    r = await client.post("/v1/adapters/rollback", headers=admin)
    assert r.json()["live"] == v1 and await loaded() == {a1.serving_name}
    assert await ask() == first

    # A promotion elsewhere (the Temporal worker calls the registry directly) is noticed by the
    # next request for ``default``, which unloads the version it no longer serves.
    async with create_sessionmaker(backend.engine)() as s:
        await deployments.promote(s, tenant_id=tenant.id, version_id=v3)
    assert await loaded() == {a1.serving_name}
    third = await ask()
    assert third not in (first, second)
    assert await loaded() == {a3.serving_name}

    # A process that starts after the promotion (a restart, another replica of the API) unloads,
    # on the tenant's first request, the version that promotion replaced.
    assert await ask(v1) == first
    assert await loaded() == {a1.serving_name, a3.serving_name}
    restarted = create_app(backend.settings, engine=backend.engine, backend=engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=restarted), base_url="http://tuneloop.test"
    ) as other:
        body = {"model": "default", "messages": PROMPT, "max_tokens": 8, "temperature": 0}
        r = await other.post("/v1/chat/completions", headers=tenant.auth(), json=body)
        assert r.json()["choices"][0]["message"]["content"] == third
        await restarted.state.placement.drain()
    assert await loaded() == {a3.serving_name}


class _RecordingEngine:
    """Only what the placement calls: which serving names it loads and unloads."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.unloaded: list[str] = []

    async def load(self, adapter: AdapterRef) -> None:
        self.loaded.append(adapter.serving_name)

    async def unload(self, serving_name: str) -> None:
        self.unloaded.append(serving_name)


async def test_a_promotion_racing_another_unloads_the_version_it_really_replaced(
    tenant: TenantKeys,
    backend: Backend,
    fresh_adapters: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (v1, _), (v2, a2), (v3, a3) = [
        await register(backend, tenant.id, fresh_adapters(seed)) for seed in (111, 112, 113)
    ]
    sessionmaker = create_sessionmaker(backend.engine)
    async with sessionmaker() as s:
        await deployments.promote(s, tenant_id=tenant.id, version_id=v1)
    engine = _RecordingEngine()
    store = ArtifactStore(backend.settings.data_dir / "artifacts")
    placement = AdapterPlacement(engine, store)  # type: ignore[arg-type]
    real_get_version = deployments.get_version
    raced: list[bool] = []

    async def get_version(session: Any, **kw: Any) -> Any:
        if not raced:  # another process promotes v3 while this promotion is under way
            raced.append(True)
            async with sessionmaker() as other:
                await deployments.promote(other, tenant_id=tenant.id, version_id=v3)
        return await real_get_version(session, **kw)

    monkeypatch.setattr(deployments, "get_version", get_version)
    async with sessionmaker() as s:
        await placement.promote(s, tenant_id=tenant.id, version_id=v2)
    await placement.drain()
    assert raced
    assert engine.loaded == [a2.serving_name]  # preloaded before the pointer moved
    assert engine.unloaded == [a3.serving_name]  # v2 replaced v3: v3 is not left loaded


async def test_the_workers_promotions_move_adapters_on_the_serving_tier_it_was_given(
    client: httpx.AsyncClient,
    tenant: TenantKeys,
    backend: Backend,
    fresh_adapters: Callable[[int], Path],
) -> None:
    """The workflow's activities, given the serving engine (as the embedded stack gives its
    worker the API's), preload what they promote or put in a canary, and unload what leaves."""
    engine = engine_of(client)
    (v1, a1), (v2, a2), (v3, a3) = [
        await register(backend, tenant.id, fresh_adapters(seed)) for seed in (114, 115, 116)
    ]
    sessionmaker = create_sessionmaker(backend.engine)
    async with sessionmaker() as s:
        run = TrainingRun(tenant_id=tenant.id, status=RunStatus.running)
        s.add(run)
        await s.commit()
        run_id = run.id
    activities = PersonalizationActivities(
        sessionmaker=sessionmaker,
        store=ArtifactStore(backend.settings.data_dir / "artifacts"),
        data_dir=backend.settings.data_dir,
        serving=engine,
    )
    names = {a1.serving_name, a2.serving_name, a3.serving_name}

    async def loaded() -> set[str]:
        await activities.placement.drain()
        return set(engine.loaded_adapters) & names

    await activities.promote_adapter(PromoteInput(tenant.id, run_id, v1))
    assert await loaded() == {a1.serving_name}
    await activities.promote_adapter(PromoteInput(tenant.id, run_id, v2))
    assert await loaded() == {a2.serving_name}
    # A canary's candidate is loaded before it answers anyone; rolled back, it is unloaded.
    await activities.start_canary(CanaryInput(tenant.id, run_id, v3))
    assert await loaded() == {a2.serving_name, a3.serving_name}
    verdict = await activities.look_at_canary(CanaryInput(tenant.id, run_id, v3, abort="test"))
    assert verdict.action == "rollback"
    assert await loaded() == {a2.serving_name}
