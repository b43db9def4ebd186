"""The serving gateway as one object, asked directly (the routes' behaviour through HTTP is in
``test_inference.py``): what it records when a streamed answer is cut short."""

from __future__ import annotations

from sqlalchemy import select

from api.app import create_app
from core.db import create_sessionmaker
from core.models import Interaction, UsageRecord
from serving.gateway import Ask, Gateway
from serving.types import Generation, GenerationRequest
from tests.conftest import Backend, TenantKeys

PROMPT = [{"role": "user", "content": "tell me about the weather"}]


def _ask(tenant: TenantKeys, *, max_tokens: int) -> Ask:
    return Ask(
        tenant_id=tenant.id,
        key_id="key-under-test",
        endpoint="chat.completions",
        model="default",
        user=None,
        generation=GenerationRequest(
            adapter=None, messages=PROMPT, max_tokens=max_tokens, temperature=0
        ),
    )


async def test_a_stream_closed_mid_answer_records_and_meters_what_was_sent(
    backend: Backend, tenant: TenantKeys
) -> None:
    app = create_app(backend.settings, engine=backend.engine)
    gateway: Gateway = app.state.gateway
    sessions = create_sessionmaker(backend.engine)
    try:
        # The whole answer first, to know it is longer than what the client will read.
        async with sessions() as s:
            whole = await gateway.stream(s, _ask(tenant, max_tokens=12))
        items = [piece async for piece in whole.pieces]
        whole.release()
        assert isinstance(items[-1], Generation) and len(items) > 3

        async with sessions() as s:
            cut = await gateway.stream(s, _ask(tenant, max_tokens=12))
        first = await anext(cut.pieces)
        assert isinstance(first, str)
        await cut.pieces.aclose()  # the client left after one piece
        cut.release()
        assert app.state.limits.in_flight(tenant.id) == 0

        async with sessions() as s:
            row = await s.get(Interaction, cut.interaction_id)
            usage = await s.scalar(
                select(UsageRecord.quantity).where(
                    UsageRecord.idempotency_key == f"inference:{cut.interaction_id}"
                )
            )
        assert row is not None and row.tenant_id == tenant.id
        assert row.completion == first and row.completion_tokens == 1
        assert row.sampling["finish_reason"] == "disconnected"
        # The prompt estimated from its length (no engine counts yet), plus the one piece sent.
        assert row.prompt_tokens > 0 and usage == row.prompt_tokens + 1
    finally:
        await app.state.backend.close()
