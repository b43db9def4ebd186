"""The gateway's bookkeeping around an answer: every answer is an ``interactions`` row (so
feedback knows exactly what it rates) and its tokens land in the usage ledger."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.ids import new_id
from core.models import Interaction
from core.usage import INFERENCE_TOKENS, record_usage
from serving.registry import Resolved
from serving.types import Choice, GenerationRequest


def new_interaction_ids(n: int) -> list[str]:
    return [new_id("int") for _ in range(n)]


async def record_answer(
    session: AsyncSession,
    *,
    tenant_id: str,
    resolved: Resolved,
    request: GenerationRequest,
    choices: list[Choice],
    prompt_tokens: int,
    latency_ms: float,
    interaction_ids: list[str],
    endpoint: str,
) -> None:
    """One interaction per choice and one usage row for the request, committed together."""
    messages: list[dict[str, Any]] = (
        [dict(m) for m in request.messages]
        if request.messages is not None
        else [{"role": "user", "content": request.prompt or ""}]
    )
    sampling = {
        k: v for k, v in asdict(request).items() if k not in ("adapter", "messages", "prompt")
    }
    sampling["endpoint"] = endpoint
    for interaction_id, choice in zip(interaction_ids, choices, strict=True):
        session.add(
            Interaction(
                id=interaction_id,
                tenant_id=tenant_id,
                adapter_version_id=resolved.version.id if resolved.version else None,
                model=resolved.label,
                messages=messages,
                completion=choice.text,
                prompt_tokens=prompt_tokens,
                completion_tokens=choice.completion_tokens,
                sampling={**sampling, "finish_reason": choice.finish_reason},
                latency_ms=latency_ms,
            )
        )
    tokens = prompt_tokens * len(choices) + sum(c.completion_tokens for c in choices)
    await record_usage(
        session,
        tenant_id=tenant_id,
        meter=INFERENCE_TOKENS,
        quantity=tokens,
        idempotency_key=f"inference:{interaction_ids[0]}",
    )
    await session.commit()
