"""``GET /v1/export``: everything tuneloop keeps of a tenant's users, as JSON lines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.deps import AdminTenantDep
from core.export import export_tenant

router = APIRouter(prefix="/v1", tags=["export"])


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "one JSON object per line: every feedback item (object: feedback), "
            "served answer (interaction) and adapter version (adapter_version) of the tenant",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        }
    },
)
async def export(request: Request, tenant_id: AdminTenantDep) -> StreamingResponse:
    """The tenant's data to take elsewhere (GDPR Article 20), streamed: feedback, interactions
    and adapter versions, oldest first. The adapters' files stay on the volume."""

    async def lines() -> AsyncIterator[bytes]:
        async for row in export_tenant(request.app.state.sessionmaker, tenant_id):
            yield (json.dumps(row, ensure_ascii=False) + "\n").encode()

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="tuneloop-export.jsonl"'},
    )
