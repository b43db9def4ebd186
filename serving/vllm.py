"""The production backend: a pool of vLLM OpenAI-compatible servers started with ``--enable-lora``.

Routing. Each serving name hashes onto a ring of replicas (consistent hashing with virtual nodes),
so an adapter is always sent to the same replica while that replica is up and stays warm in its
LoRA cache; adding or losing a replica moves only the adapters that hashed to it. A replica that
refuses or drops a connection is marked dead for ``retry_dead_after`` seconds, the request moves
to the next replica on the ring, and the adapter is loaded there. Base-model requests are spread
round-robin: they need no warm state.

Loading. Before an adapter's first use on a replica the backend calls
``POST /v1/load_lora_adapter`` with the artifact path (replicas must see the artifact store at the
same path as the gateway — a shared volume). If vLLM later answers 404 for the name (the replica
restarted, or the adapter was unloaded), the backend loads it again and retries once. Replicas
that also run tuneloop's resolver plugin (``serving.vllm_resolver``) find adapters by name on
their own, which makes that retry rare; the backend works with or without it.

Fallback. When an adapter cannot be loaded (missing or incompatible files, a load that times
out), the request fails with 503 ``adapter_unavailable`` — unless the request's
``fallback_to_base`` (its tenant's policy) is set, in which case the base model answers and
``Generation.served_by`` says ``"base (fallback)"`` so the caller can tell (and so the gateway
can record that no adapter computed the answer). When no replica is reachable at all there is
nothing to fall back to: 503 ``serving_unavailable``.

Unloading. ``unload`` removes a retired version's name from every replica that is up (a
failover may have loaded it away from its owner), so replicas do not collect dead adapters.

Safety. vLLM takes adapter names and paths at face value (its filesystem resolver follows
``../``), so this backend only ever sends names that ``serving.names`` generated, and the
runtime-load routes it calls must stay on a private network.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from core.errors import ContextLengthExceeded, InvalidInput, Unavailable
from serving.names import is_serving_name
from serving.types import FALLBACK, AdapterRef, Choice, Generation, GenerationRequest, Served

__all__ = ["HashRing", "VllmPoolBackend"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class HashRing:
    """Consistent hashing of names onto replicas. ``preference(name)`` is the order in which the
    replicas should be tried for ``name``: its owner first, then the ones that take over."""

    def __init__(self, nodes: Sequence[str], vnodes: int = 64) -> None:
        if not nodes:
            raise ValueError("a hash ring needs at least one node")
        points = sorted((_hash(f"{node}#{i}"), node) for node in nodes for i in range(vnodes))
        self._keys = [p for p, _ in points]
        self._nodes = [n for _, n in points]
        self.size = len(set(nodes))

    def preference(self, name: str) -> list[str]:
        start = bisect.bisect(self._keys, _hash(name))
        order: list[str] = []
        for i in range(len(self._nodes)):
            node = self._nodes[(start + i) % len(self._nodes)]
            if node not in order:
                order.append(node)
                if len(order) == self.size:
                    break
        return order


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big")


class _ReplicaDown(Exception):
    """The replica did not answer (connection refused or dropped): try the next one."""


class _ModelMissing(Exception):
    """The replica answered 404 for the model: it does not (or no longer) know the adapter."""


class _LoadFailed(Exception):
    """The replica is up but could not load the adapter."""


@dataclass
class _Replica:
    url: str
    dead_until: float = 0.0
    base_name: str | None = None  # what the replica calls its base model (discovered)
    loaded: set[str] = field(default_factory=set)  # adapters this backend loaded there
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # one load per adapter at once


class VllmPoolBackend:
    """``ServingBackend`` over vLLM replicas. See the module docstring for routing and fallback."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        base_model_name: str | None = None,
        request_timeout: float = 300.0,
        connect_timeout: float = 3.0,
        load_timeout: float = 30.0,
        retry_dead_after: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """
        Args:
            urls: base URLs of the replicas (``http://host:port``), private network only.
            base_model_name: the base model's name on the replicas (``--served-model-name``);
                discovered from ``GET /v1/models`` when not given.
            request_timeout: seconds a completion may take before it fails with 503.
            connect_timeout: seconds to wait for a connection before a replica counts as dead.
            load_timeout: seconds an adapter load may take before it counts as failed.
            retry_dead_after: seconds a dead replica is skipped before it is tried again.
            client: an httpx client to use (not closed by ``close()``); one is made otherwise.
        """
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("the vLLM pool needs at least one replica URL")
        self.load_timeout = load_timeout
        self.retry_dead_after = retry_dead_after
        self._replicas = {u: _Replica(u, base_name=base_model_name) for u in urls}
        self._ring = HashRing(urls)
        self._round_robin = itertools.count()
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout)
        )

    # --- ServingBackend ---------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        async def call(replica: _Replica, model: str, served_by: str) -> Generation:
            path, body = _openai_body(request, model)
            try:
                response = await self._client.post(f"{replica.url}{path}", json=body)
            except httpx.TransportError as exc:
                raise self._transport_failure(replica, exc) from exc
            _raise_for_status(replica, response)
            return _generation(response.json(), request, served_by)

        return await self._route(request, call)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Served | str | Generation]:
        if request.n != 1:
            raise ValueError("streaming answers one choice at a time (n=1)")

        async def call(replica: _Replica, model: str, served_by: str) -> _Opened:
            path, body = _openai_body(request, model)
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            outgoing = self._client.build_request("POST", f"{replica.url}{path}", json=body)
            try:
                response = await self._client.send(outgoing, stream=True)
            except httpx.TransportError as exc:
                raise self._transport_failure(replica, exc) from exc
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                _raise_for_status(replica, response)
            return _Opened(response, served_by)

        # Routing, loading and retries happen before the first piece: once text has gone out,
        # a failure can only end the stream.
        opened = await self._route(request, call)
        try:
            yield Served(opened.served_by)
            async for item in _read_sse(opened.response, request, opened.served_by):
                yield item
        except httpx.TransportError as exc:
            raise Unavailable(
                "the vLLM replica stopped while streaming", code="serving_unavailable"
            ) from exc
        finally:
            await opened.response.aclose()

    async def load(self, adapter: AdapterRef) -> None:
        """Load ``adapter`` where a request for it would go (its ring owner, or the next replica
        up when the owner is down): the request path's own routing, with nothing to generate."""

        async def loaded(replica: _Replica, model: str, served_by: str) -> None:
            return None

        await self._route(GenerationRequest(adapter=adapter), loaded)

    async def unload(self, serving_name: str) -> None:
        """Forget ``serving_name`` on every replica that is up (a retired version). A replica
        with the resolver plugin would load it again if it were asked for it."""
        _check_name(serving_name)
        for replica in self._replicas.values():
            replica.loaded.discard(serving_name)
            if self._is_dead(replica):
                continue
            try:
                response = await self._client.post(
                    f"{replica.url}/v1/unload_lora_adapter",
                    json={"lora_name": serving_name},
                    timeout=self.load_timeout,
                )
            except httpx.TransportError as exc:
                self._transport_failure(replica, exc)
                continue
            if response.status_code not in (200, 404):  # 404: it was not loaded there
                log.warning(
                    "unloading %s on %s: HTTP %s %s",
                    serving_name,
                    replica.url,
                    response.status_code,
                    response.text[:200],
                )

    async def close(self) -> None:
        if self._own_client:
            await self._client.aclose()

    # --- introspection (operators, tests) ---------------------------------------------------

    def replica_for(self, serving_name: str) -> str:
        """The replica that serves ``serving_name`` now: its ring owner unless that one is dead."""
        return self._candidates(self._ring.preference(serving_name))[0].url

    @property
    def dead_replicas(self) -> list[str]:
        return [r.url for r in self._replicas.values() if self._is_dead(r)]

    # --- routing ----------------------------------------------------------------------------

    async def _route(
        self,
        request: GenerationRequest,
        call: Callable[[_Replica, str, str], Awaitable[_T]],
    ) -> _T:
        adapter = request.adapter
        if adapter is None:
            return await self._on_base(call, "base")
        _check_name(adapter.serving_name)
        for replica in self._candidates(self._ring.preference(adapter.serving_name)):
            try:
                return await self._on_adapter(replica, adapter, call)
            except _ReplicaDown:
                continue  # already marked dead: the next replica on the ring takes the adapter
            except _LoadFailed as exc:
                if not request.fallback_to_base:
                    raise Unavailable(
                        f"the adapter {adapter.serving_name} cannot be served right now",
                        code="adapter_unavailable",
                    ) from exc
                log.warning("serving %s from the base model: %s", adapter.serving_name, exc)
                return await self._on_base(call, FALLBACK)
        raise Unavailable("no vLLM replica is reachable", code="serving_unavailable")

    async def _on_adapter(
        self,
        replica: _Replica,
        adapter: AdapterRef,
        call: Callable[[_Replica, str, str], Awaitable[_T]],
    ) -> _T:
        name = adapter.serving_name
        await self._ensure_loaded(replica, adapter)
        try:
            return await call(replica, name, name)
        except _ModelMissing:
            # The replica lost it (restart, unload by another gateway): load and retry once.
            replica.loaded.discard(name)
            await self._ensure_loaded(replica, adapter)
            try:
                return await call(replica, name, name)
            except _ModelMissing as exc:
                raise _LoadFailed(f"{replica.url} loaded {name} but does not serve it") from exc

    async def _on_base(
        self, call: Callable[[_Replica, str, str], Awaitable[_T]], served_by: str
    ) -> _T:
        replicas = list(self._replicas.values())
        turn = next(self._round_robin) % len(replicas)
        order = [r.url for r in replicas[turn:] + replicas[:turn]]
        for replica in self._candidates(order):
            try:
                return await call(replica, await self._base_name(replica), served_by)
            except _ReplicaDown:
                continue
            except _ModelMissing as exc:  # the base model always exists on a healthy replica
                log.warning("vLLM replica %s does not serve the base model", replica.url)
                raise Unavailable(
                    "a vLLM replica does not serve the base model", code="serving_unavailable"
                ) from exc
        raise Unavailable("no vLLM replica is reachable", code="serving_unavailable")

    def _candidates(self, order: list[str]) -> list[_Replica]:
        replicas = [self._replicas[u] for u in order]
        alive = [r for r in replicas if not self._is_dead(r)]
        # Everything marked dead: the marks may be stale, so try them all rather than none.
        return alive or replicas

    def _is_dead(self, replica: _Replica) -> bool:
        return replica.dead_until > time.monotonic()

    # --- replica state ----------------------------------------------------------------------

    async def _ensure_loaded(self, replica: _Replica, adapter: AdapterRef) -> None:
        name = adapter.serving_name
        if name in replica.loaded:
            return
        lock = replica.locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in replica.loaded:  # a concurrent request loaded it while we waited
                return
            try:
                response = await self._client.post(
                    f"{replica.url}/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": str(adapter.path)},
                    timeout=self.load_timeout,
                )
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    raise self._transport_failure(replica, exc) from exc
                raise _LoadFailed(f"loading {name} on {replica.url} timed out") from exc
            except httpx.TransportError as exc:
                raise self._transport_failure(replica, exc) from exc
            if response.status_code == 200:
                log.info("loaded adapter %s on %s", name, replica.url)
            elif response.status_code == 400 and await self._lists(replica, name):
                pass  # already loaded there (by its resolver, or another gateway process)
            else:
                raise _LoadFailed(
                    f"{replica.url} could not load {name}: HTTP {response.status_code} "
                    f"{_error_message(response)}"
                )
            replica.loaded.add(name)

    async def _lists(self, replica: _Replica, name: str) -> bool:
        return name in {m["id"] for m in await self._models(replica)}

    async def _base_name(self, replica: _Replica) -> str:
        if replica.base_name is None:
            models = await self._models(replica)
            bases = [m["id"] for m in models if m.get("parent") is None]
            if not bases:
                log.warning("vLLM replica %s lists no base model", replica.url)
                raise Unavailable("a vLLM replica lists no base model", code="serving_unavailable")
            replica.base_name = bases[0]
        return replica.base_name

    async def _models(self, replica: _Replica) -> list[dict[str, Any]]:
        try:
            response = await self._client.get(f"{replica.url}/v1/models")
        except httpx.TransportError as exc:
            raise self._transport_failure(replica, exc) from exc
        _raise_for_status(replica, response)
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    def _transport_failure(self, replica: _Replica, exc: httpx.TransportError) -> Exception:
        """What to raise for a transport error: the replica is dead, or only slow."""
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            # It accepted the request but is slow: another replica would not be faster, and
            # marking it dead would move all of its adapters.
            log.warning("vLLM replica %s timed out", replica.url)
            return Unavailable("a vLLM replica timed out", code="serving_unavailable")
        log.warning("vLLM replica %s is unreachable (%s): marking it dead", replica.url, exc)
        replica.dead_until = time.monotonic() + self.retry_dead_after
        # It may come back restarted, without our adapters: load them again then.
        replica.loaded.clear()
        return _ReplicaDown(replica.url)


def _check_name(name: str) -> None:
    if not is_serving_name(name):
        # Not a client error: the gateway resolves names, so this is a bug upstream.
        raise ValueError(f"refusing to send a non-tuneloop adapter name to vLLM: {name!r}")


def _raise_for_status(replica: _Replica, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    if status == 404:
        raise _ModelMissing(_error_message(response))
    if status == 400:
        # The gateway validated the parameters; what is left is what only the engine knows
        # (e.g. prompt plus max_tokens longer than the model's context).
        message = _error_message(response)
        # vLLM's words for it; OpenAI's code, which clients (LangChain, LiteLLM) look for.
        long = any(w in message.lower() for w in ("context length", "model length", "too long"))
        raise (
            ContextLengthExceeded(message)
            if long
            else InvalidInput(message, code="invalid_request")
        )
    # Replica addresses and the engine's own words (paths, internals) go to the log only.
    log.warning(
        "vLLM replica %s answered HTTP %s: %s", replica.url, status, _error_message(response)
    )
    raise Unavailable(f"a vLLM replica answered HTTP {status}", code="serving_unavailable")


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _openai_body(request: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": request.n,
        # vLLM's extension: per-choice token ids, so each choice's token count is exact.
        "return_token_ids": True,
    }
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.messages is not None:
        body["messages"] = [dict(m) for m in request.messages]
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt or ""
    return "/v1/completions", body


def _finish_reason(value: object) -> str:
    # tuneloop's contract is "stop" | "length"; vLLM may also say e.g. "abort" for a stop
    # it decided on itself, which for the caller is a stop.
    return "length" if value == "length" else "stop"


def _generation(payload: dict[str, Any], request: GenerationRequest, served_by: str) -> Generation:
    usage = payload.get("usage") or {}
    choices = []
    for raw in sorted(payload["choices"], key=lambda c: c["index"]):
        text = raw["message"].get("content") if "message" in raw else raw.get("text")
        token_ids = raw.get("token_ids")
        tokens = (
            len(token_ids)
            if token_ids is not None
            else int(usage.get("completion_tokens", 0)) // max(request.n, 1)
        )
        choices.append(
            Choice(
                text=text or "",
                finish_reason=_finish_reason(raw.get("finish_reason")),
                completion_tokens=tokens,
            )
        )
    return Generation(
        choices=choices, prompt_tokens=int(usage.get("prompt_tokens", 0)), served_by=served_by
    )


@dataclass
class _Opened:
    response: httpx.Response
    served_by: str


async def _read_sse(
    response: httpx.Response, request: GenerationRequest, served_by: str
) -> AsyncIterator[str | Generation]:
    """vLLM's server-sent events → text pieces, then the finished ``Generation``."""
    pieces: list[str] = []
    finish: object = None
    usage: dict[str, Any] = {}
    tokens = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            tokens += len(choice.get("token_ids") or [])
            finish = choice.get("finish_reason") or finish
            if piece:
                pieces.append(piece)
                yield piece
    completion_tokens = int(usage.get("completion_tokens", tokens))
    yield Generation(
        choices=[
            Choice(
                text="".join(pieces),
                finish_reason=_finish_reason(finish),
                completion_tokens=completion_tokens,
            )
        ],
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        served_by=served_by,
    )
