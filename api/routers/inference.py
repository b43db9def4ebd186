"""OpenAI-compatible inference: product code switches by changing ``base_url`` and the key."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import BackendDep, ProductTenantDep, SessionDep, StoreDep
from api.rate_limits import Limits
from api.schemas_inference import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelList,
    ModelOut,
    sse,
    usage_of,
)
from core import deployments
from core.billing import InferenceGate
from core.deployments import CANDIDATE
from core.errors import DomainError, InvalidInput
from core.interactions import new_interaction_ids
from serving.gateway import AdapterPlacement, record_answer
from serving.registry import BASE, DEFAULT, Resolved, resolve_model
from serving.types import (
    FALLBACK,
    Choice,
    Generation,
    GenerationRequest,
    Served,
    ServingBackend,
)
from trainer.control_tokens import neutralize_control_tokens

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["inference"])
# The route-specific errors (the shared ones are documented by api.errors).
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    402: {
        "description": "billing_suspended (unpaid, where the operator blocks inference) or "
        "budget_exceeded (the month's budget is reached and the policy blocks inference)"
    },
    404: {"description": "`model` is not default, base or one of the tenant's versions"},
}
# With ``stream: true`` the answer is server-sent events, described per event: ``data`` is a
# JSON chunk, and the last one is ``[DONE]``.
STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            "required": ["data"],
        }
    }
}


def _neutralized(message: dict[str, Any]) -> dict[str, Any]:
    for field in ("content", "name"):  # a template may render the name too
        if isinstance(message.get(field), str):
            message[field] = neutralize_control_tokens(message[field])
    return message


def _generation_request(
    body: ChatCompletionRequest | CompletionRequest, resolved: Resolved, *, fallback_to_base: bool
) -> GenerationRequest:
    unsupported = body.refuse_unsupported()
    if unsupported is not None:
        raise InvalidInput(
            f"the parameter {unsupported!r} is not supported by tuneloop",
            details={"field": unsupported},
            code="unsupported_parameter",
        )
    if body.stream and body.n != 1:
        raise InvalidInput("stream=true answers one choice: set n=1", details={"field": "n"})
    return GenerationRequest(
        adapter=resolved.adapter,
        # A user's text never becomes template structure (a forged system turn): see
        # trainer.control_tokens. The interaction records what the model was given.
        messages=[_neutralized(m.model_dump(exclude_none=True)) for m in body.messages]
        if isinstance(body, ChatCompletionRequest)
        else None,
        prompt=body.prompt if isinstance(body, CompletionRequest) else None,
        max_tokens=body.token_limit,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=body.stops,
        seed=body.seed,
        fallback_to_base=fallback_to_base,
    )


async def _answer(
    body: ChatCompletionRequest | CompletionRequest,
    *,
    endpoint: str,
    request: Request,
    response: Response,
    session: Any,
    tenant_id: str,
    backend: ServingBackend,
    store: Any,
) -> tuple[Resolved, Generation, list[str]] | StreamingResponse:
    # Billing (unpaid subscription, budget) and the tenant's policy from a per-process memo: no
    # query per request.
    gate: InferenceGate = request.app.state.inference_gate
    policy = await gate.admit(tenant_id)
    resolved = await resolve_model(
        session, store, tenant_id=tenant_id, model=body.model, user=body.user
    )
    if body.model == DEFAULT and resolved.canary_arm != CANDIDATE:
        # A promotion or rollback elsewhere shows here: unload the old one. (A canary's
        # candidate is not what default points to: it must not unload the live version.)
        placement: AdapterPlacement = request.app.state.placement
        await placement.served_default(
            session,
            tenant_id=tenant_id,
            serving_name=resolved.adapter.serving_name if resolved.adapter else None,
        )
    gen_request = _generation_request(body, resolved, fallback_to_base=policy.fallback_to_base)
    # Hand the connection back while the model works (seconds): otherwise concurrent requests
    # exhaust the pool. Recording the answer takes one again.
    await session.close()
    limits: Limits = request.app.state.limits
    ids = new_interaction_ids(body.n)
    started = time.perf_counter()
    if body.stream:
        release = limits.start_generation(tenant_id)
        try:
            await limits.answer_tokens(request.state.principal.key_id, body.token_limit)
            # Routing and adapter loading finish before the first item: their errors are this
            # request's (503 adapter_unavailable), and a fallback is known in time for the
            # headers.
            pieces = backend.stream(gen_request)
            served = await anext(pieces)
            if not isinstance(served, Served):
                raise TypeError(f"a backend's stream must begin with Served, not {served!r}")
        except BaseException as exc:
            release()
            await _failed_on_canary(request, tenant_id, resolved, exc)
            raise
        if served.served_by == FALLBACK:
            resolved = replace(resolved, version=None, adapter=None, fallback=True)
        return _SlotStreamingResponse(
            _stream(request, endpoint, tenant_id, resolved, gen_request, ids[0], pieces),
            release=release,
            media_type="text/event-stream",
            headers={
                "X-Interaction-Id": ids[0],
                "X-Served-By": resolved.label,
                "Cache-Control": "no-cache",
            },
        )
    async with limits.generation(tenant_id):
        await limits.answer_tokens(request.state.principal.key_id, body.token_limit * body.n)
        try:
            generation = await backend.generate(gen_request)
        except Exception as exc:
            await _failed_on_canary(request, tenant_id, resolved, exc)
            raise
    if generation.served_by == FALLBACK:  # say so, and record what really answered
        resolved = replace(resolved, version=None, adapter=None, fallback=True)
    await record_answer(
        session,
        tenant_id=tenant_id,
        resolved=resolved,
        request=gen_request,
        choices=generation.choices,
        prompt_tokens=generation.prompt_tokens,
        latency_ms=(time.perf_counter() - started) * 1000,
        interaction_ids=ids,
        endpoint=endpoint,
    )
    response.headers["X-Interaction-Id"] = ",".join(ids)
    response.headers["X-Served-By"] = resolved.label
    return resolved, generation, ids


async def _failed_on_canary(
    request: Request, tenant_id: str, resolved: Resolved, exc: BaseException
) -> None:
    """A request the canary routed that got no answer counts against its arm (the canary's
    health check compares the arms' error rates). A client's mistake (a 4xx: too long, over a
    limit) is not the version's failure, nor is a client that left."""
    if resolved.canary_arm is None or resolved.canary_version_id is None:
        return
    if not isinstance(exc, Exception) or (isinstance(exc, DomainError) and exc.status < 500):
        return
    try:
        with anyio.CancelScope(shield=True):
            async with request.app.state.sessionmaker() as session:
                await deployments.record_canary_failure(
                    session,
                    tenant_id=tenant_id,
                    canary_version_id=resolved.canary_version_id,
                    arm=resolved.canary_arm,
                )
    except Exception:  # the request's own error is what its caller must hear, not this one
        log.warning("could not count a failed request against its canary arm", exc_info=True)


class _SlotStreamingResponse(StreamingResponse):
    """A stream that gives the tenant's in-flight slot back when the response ends, however it
    ends: finished, failed, or cancelled by a client that left (then the body generator may
    never even start, and no ``finally`` inside it would run)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            if isinstance(self.body_iterator, AsyncGenerator):
                await self.body_iterator.aclose()  # its cleanup runs now, not when collected


async def _stream(
    request: Request,
    endpoint: str,
    tenant_id: str,
    resolved: Resolved,
    gen_request: GenerationRequest,
    interaction_id: str,
    pieces: AsyncIterator[Served | str | Generation],
) -> AsyncIterator[bytes]:
    started = time.perf_counter()
    created = int(time.time())
    chat = endpoint == "chat.completions"
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | (
                {"content": delta} if delta else {}
            )
        else:
            choice["text"] = delta or ""
        return {
            "id": interaction_id,
            "object": kind,
            "created": created,
            "model": resolved.label,
            "choices": [choice],
            "interaction_id": interaction_id,
            "served_by": resolved.label,
        }

    sent: list[str] = []
    finished: Generation | None = None
    failed = False
    try:
        if chat:
            yield sse(chunk(None, None, role=True))
        async for piece in pieces:
            if isinstance(piece, Served):
                continue  # already taken by _answer
            if isinstance(piece, Generation):
                finished = piece
                yield sse(chunk(None, piece.choices[0].finish_reason))
                yield sse("[DONE]")
            else:
                sent.append(piece)
                yield sse(chunk(piece, None))
    except Exception as exc:
        failed = True  # the engine failed: the answer is broken off, and nothing is billed
        await _failed_on_canary(request, tenant_id, resolved, exc)
        raise
    finally:
        # Also when the client went away mid-answer (this generator is cancelled or closed):
        # what it was sent was computed, so it is recorded and metered, shielded from the
        # cancellation. Without the engine's final counts, the prompt is estimated from its
        # length (~4 characters per token) and each piece counts as one token.
        if not failed and finished is None:
            finished = Generation(
                choices=[Choice("".join(sent), "disconnected", len(sent))],
                prompt_tokens=math.ceil(_prompt_chars(gen_request) / 4),
            )
        if finished is not None:
            with anyio.CancelScope(shield=True):
                async with request.app.state.sessionmaker() as session:
                    await record_answer(
                        session,
                        tenant_id=tenant_id,
                        resolved=resolved,
                        request=gen_request,
                        choices=finished.choices,
                        prompt_tokens=finished.prompt_tokens,
                        latency_ms=(time.perf_counter() - started) * 1000,
                        interaction_ids=[interaction_id],
                        endpoint=endpoint,
                    )


def _prompt_chars(request: GenerationRequest) -> int:
    if request.messages is None:
        return len(request.prompt or "")
    return sum(len(str(m.get("content") or "")) for m in request.messages)


def _common(answer: tuple[Resolved, Generation, list[str]]) -> dict[str, Any]:
    """The fields chat and text completions share."""
    resolved, generation, ids = answer
    return {
        "id": ids[0],
        "created": int(time.time()),
        # The version that answered (as OpenAI names the snapshot behind an alias): during a
        # canary, "default" is one of two versions, and a fallback says so where clients look.
        "model": resolved.label,
        "interaction_id": ids[0],
        "served_by": resolved.label,
        "usage": usage_of(
            generation.prompt_tokens, [c.completion_tokens for c in generation.choices]
        ),
    }


@router.post(
    "/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletion, "content": STREAM}, **MODEL_ERRORS},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant_id: ProductTenantDep,
    backend: BackendDep,
    store: StoreDep,
) -> ChatCompletion | StreamingResponse:
    """Answer a conversation with the tenant's adapter (``model``: default, base or a version).
    The answer's ``interaction_id`` (also the ``X-Interaction-Id`` header) is what feedback
    rates."""
    out = await _answer(
        body,
        endpoint="chat.completions",
        request=request,
        response=response,
        session=session,
        tenant_id=tenant_id,
        backend=backend,
        store=store,
    )
    if isinstance(out, StreamingResponse):
        return out
    _, generation, ids = out
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(content=c.text),
            finish_reason=c.finish_reason,
            interaction_id=ids[i],
        )
        for i, c in enumerate(generation.choices)
    ]
    return ChatCompletion(**_common(out), choices=choices)


@router.post(
    "/completions",
    response_model=None,
    responses={200: {"model": Completion, "content": STREAM}, **MODEL_ERRORS},
)
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant_id: ProductTenantDep,
    backend: BackendDep,
    store: StoreDep,
) -> Completion | StreamingResponse:
    """Continue a raw prompt (no chat template)."""
    out = await _answer(
        body,
        endpoint="completions",
        request=request,
        response=response,
        session=session,
        tenant_id=tenant_id,
        backend=backend,
        store=store,
    )
    if isinstance(out, StreamingResponse):
        return out
    _, generation, ids = out
    choices = [
        CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason, interaction_id=ids[i])
        for i, c in enumerate(generation.choices)
    ]
    return Completion(**_common(out), choices=choices)


@router.get("/models")
async def models(session: SessionDep, tenant_id: ProductTenantDep) -> ModelList:
    """``default``, ``base`` and the tenant's own adapter versions — nothing of other tenants."""
    now = int(time.time())
    data = [
        ModelOut(id=DEFAULT, created=now, owned_by="tenant"),
        ModelOut(id=BASE, created=now, owned_by="tuneloop"),
    ]
    for v in await deployments.list_versions(session, tenant_id=tenant_id):
        data.append(
            ModelOut(
                id=v.id,
                created=int(v.created_at.timestamp()),
                owned_by="tenant",
                status=v.status.value,
            )
        )
    return ModelList(data=data)
