"""An answer the serving tier gave: one ``interactions`` row per choice (so feedback knows exactly
what it rates, and a canary which arm gave it) and the request's tokens in the usage ledger,
committed together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from core.ids import new_id
from core.models import Interaction
from core.usage import INFERENCE_TOKENS, record_usage


class Answer(Protocol):
    """One choice of an answer (the serving tier's ``Choice``)."""

    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def completion_tokens(self) -> int: ...


def new_interaction_ids(n: int) -> list[str]:
    """Ids for an answer's ``n`` choices, known before it is computed (a stream's headers)."""
    return [new_id("int") for _ in range(n)]


async def record_answer(
    session: AsyncSession,
    *,
    tenant_id: str,
    version_id: str | None,
    model: str,
    canary_arm: str | None,
    messages: Sequence[Mapping[str, Any]],
    sampling: Mapping[str, Any],
    choices: Sequence[Answer],
    prompt_tokens: int,
    latency_ms: float,
    interaction_ids: Sequence[str],
) -> None:
    """One interaction per choice and one usage row for the request, committed together.

    ``version_id``: the adapter version that answered (None: the base model); ``model``: what
    the answer says served it; ``sampling``: the request's settings, kept with each choice's
    finish reason."""
    for interaction_id, choice in zip(interaction_ids, choices, strict=True):
        session.add(
            Interaction(
                id=interaction_id,
                tenant_id=tenant_id,
                adapter_version_id=version_id,
                model=model,
                messages=[dict(m) for m in messages],
                completion=choice.text,
                prompt_tokens=prompt_tokens,
                completion_tokens=choice.completion_tokens,
                sampling={**sampling, "finish_reason": choice.finish_reason},
                latency_ms=latency_ms,
                canary_arm=canary_arm,
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
