"""``DELETE /v1/users/{user_id}/data``: erase one end user's data (see :mod:`core.erasure`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel

from api.deps import AdminTenantDep, SessionDep
from core.erasure import erase_user

router = APIRouter(prefix="/v1/users", tags=["users"])


class ErasureOut(BaseModel):
    object: Literal["erasure"] = "erasure"
    user_id: str
    feedback_deleted: int
    interactions_deleted: int
    """Served answers the user's feedback rated."""
    datasets_deleted: int
    """Compiled datasets (files on the volume) that held the user's feedback."""
    adapter_versions_flagged: int
    """Versions trained on those datasets: ``erased_data_at`` is set on them."""


@router.delete(
    "/{user_id}/data",
    responses={404: {"description": "the tenant holds no feedback from this user"}},
)
async def erase(
    user_id: Annotated[str, Path(min_length=1, max_length=256)],
    session: SessionDep,
    tenant_id: AdminTenantDep,
) -> ErasureOut:
    """Erase everything the tenant's feedback ties to ``user_id`` (the ``user_id`` sent with
    feedback); another tenant's user of the same id is untouched. 404 when there is nothing
    (left) to erase."""
    done = await erase_user(session, tenant_id=tenant_id, user_id=user_id)
    return ErasureOut(
        user_id=done.user_id,
        feedback_deleted=done.feedback_deleted,
        interactions_deleted=done.interactions_deleted,
        datasets_deleted=done.datasets_deleted,
        adapter_versions_flagged=done.adapter_versions_flagged,
    )
