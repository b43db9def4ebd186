"""OpenAI-compatible inference: product code switches by changing ``base_url`` and the key."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import GatewayDep, ProductTenantDep, SessionDep
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
from core.errors import InvalidInput
from serving.gateway import Answer, Ask, Gateway, StreamedAnswer
from serving.registry import BASE, DEFAULT
from serving.types import Generation, GenerationRequest
from trainer.control_tokens import neutralize_control_tokens

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


def _ask(body: ChatCompletionRequest | CompletionRequest, request: Request, tenant_id: str) -> Ask:
    """The request as the gateway takes it, or a 400 for what tuneloop does not do."""
    unsupported = body.refuse_unsupported()
    if unsupported is not None:
        raise InvalidInput(
            f"the parameter {unsupported!r} is not supported by tuneloop",
            details={"field": unsupported},
            code="unsupported_parameter",
        )
    if body.stream and body.n != 1:
        raise InvalidInput("stream=true answers one choice: set n=1", details={"field": "n"})
    chat = isinstance(body, ChatCompletionRequest)
    return Ask(
        tenant_id=tenant_id,
        key_id=request.state.principal.key_id,
        endpoint="chat.completions" if chat else "completions",
        model=body.model,
        user=body.user,
        generation=GenerationRequest(
            adapter=None,  # the gateway's to choose
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
        ),
    )


async def _answer(
    body: ChatCompletionRequest | CompletionRequest,
    *,
    request: Request,
    response: Response,
    session: AsyncSession,
    tenant_id: str,
    gateway: Gateway,
) -> Answer | StreamingResponse:
    ask = _ask(body, request, tenant_id)
    if not body.stream:
        answer = await gateway.answer(session, ask)
        response.headers["X-Interaction-Id"] = ",".join(answer.interaction_ids)
        response.headers["X-Served-By"] = answer.resolved.label
        return answer
    streamed = await gateway.stream(session, ask)
    return _SlotStreamingResponse(
        _events(ask.endpoint, streamed),
        release=streamed.release,
        media_type="text/event-stream",
        headers={
            "X-Interaction-Id": streamed.interaction_id,
            "X-Served-By": streamed.resolved.label,
            "Cache-Control": "no-cache",
        },
    )


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


async def _events(endpoint: str, streamed: StreamedAnswer) -> AsyncIterator[bytes]:
    """The answer as OpenAI's server-sent chunks."""
    created = int(time.time())
    chat = endpoint == "chat.completions"
    kind = "chat.completion.chunk" if chat else "text_completion"
    label = streamed.resolved.label

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = ({"role": "assistant"} if role else {}) | (
                {"content": delta} if delta else {}
            )
        else:
            choice["text"] = delta or ""
        return {
            "id": streamed.interaction_id,
            "object": kind,
            "created": created,
            "model": label,
            "choices": [choice],
            "interaction_id": streamed.interaction_id,
            "served_by": label,
        }

    # Closing this stream (a client that left) closes the gateway's, which records what was sent.
    async with aclosing(streamed.pieces) as pieces:
        if chat:
            yield sse(chunk(None, None, role=True))
        async for piece in pieces:
            if isinstance(piece, Generation):
                yield sse(chunk(None, piece.choices[0].finish_reason))
                yield sse("[DONE]")
            else:
                yield sse(chunk(piece, None))


def _common(answer: Answer) -> dict[str, Any]:
    """The fields chat and text completions share."""
    resolved, generation, ids = answer.resolved, answer.generation, answer.interaction_ids
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
    gateway: GatewayDep,
) -> ChatCompletion | StreamingResponse:
    """Answer a conversation with the tenant's adapter (``model``: default, base or a version).
    The answer's ``interaction_id`` (also the ``X-Interaction-Id`` header) is what feedback
    rates."""
    out = await _answer(
        body,
        request=request,
        response=response,
        session=session,
        tenant_id=tenant_id,
        gateway=gateway,
    )
    if isinstance(out, StreamingResponse):
        return out
    generation, ids = out.generation, out.interaction_ids
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
    gateway: GatewayDep,
) -> Completion | StreamingResponse:
    """Continue a raw prompt (no chat template)."""
    out = await _answer(
        body,
        request=request,
        response=response,
        session=session,
        tenant_id=tenant_id,
        gateway=gateway,
    )
    if isinstance(out, StreamingResponse):
        return out
    generation, ids = out.generation, out.interaction_ids
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
