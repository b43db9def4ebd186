"""``DELETE /v1/users/{user_id}/data``: nothing of the erased user remains in the database or in
the datasets on disk, other users' data stays, and versions trained on it are flagged."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from core import erasure
from core.db import create_sessionmaker
from core.models import AdapterStatus, AdapterVersion, Dataset, Feedback, Interaction, TrainingRun
from tests.conftest import Backend, TenantKeys
from trainer import compile_feedback, write_jsonl
from trainer.compiler import FeedbackRecord

SECRET = "erin-private-question"


async def _rate(client: httpx.AsyncClient, t: TenantKeys, user: str, text: str) -> str:
    answer = await client.post(
        "/v1/chat/completions",
        headers=t.auth(),
        json={"model": "base", "messages": [{"role": "user", "content": text}], "max_tokens": 2},
    )
    interaction_id: str = answer.json()["interaction_id"]
    items = [
        {"interaction_id": interaction_id, "rating": "up", "user_id": user},
        {"prompt": f"{text} (inline)", "completion": "ok", "rating": "down", "user_id": user},
    ]
    r = await client.post("/v1/feedback", headers=t.auth(), json={"items": items})
    assert r.status_code == 201, r.text
    return interaction_id


async def _trained_on_everything(backend: Backend, t: TenantKeys, tmp_path: Path) -> str:
    """A run's compiled dataset on disk and the version it produced, as the loop leaves them."""
    maker = create_sessionmaker(backend.engine)
    async with maker() as s:
        rows = list(await s.scalars(select(Feedback).where(Feedback.tenant_id == t.id)))
        records = [
            FeedbackRecord([{"role": "user", "content": f.prompt or SECRET}], "ok", f.rating)
            for f in rows
        ]
        out = tmp_path / "dataset"
        write_jsonl(compile_feedback(records, min_records=2, holdout_fraction=0.0), out)
        run = TrainingRun(tenant_id=t.id)
        s.add(run)
        await s.flush()
        s.add(Dataset(tenant_id=t.id, run_id=run.id, content_hash="x", uri=str(out)))
        version = AdapterVersion(
            tenant_id=t.id, run_id=run.id, sha256="0" * 64, serving_name=f"t-{run.id}",
            uri="/nowhere", base_model="tiny-random", rank=4, status=AdapterStatus.candidate,
            eval_report={"win_rate": 0.6, "samples": [{"prompt": SECRET, "candidate": "a"}]},
        )  # fmt: skip
        s.add(version)
        await s.commit()
        return version.id


async def test_an_end_user_is_erased_and_only_that_user(
    client: httpx.AsyncClient,
    make_tenant,  # type: ignore[no-untyped-def]
    backend: Backend,
    tmp_path: Path,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    erins = await _rate(client, a, "erin", SECRET)
    await _rate(client, a, "frank", "frank-question")
    await _rate(client, b, "erin", "b-erin-question")  # same user id, another tenant
    version_id = await _trained_on_everything(backend, a, tmp_path)
    dataset_dir = tmp_path / "dataset"
    assert SECRET in "".join(p.read_text() for p in dataset_dir.iterdir())

    r = await client.delete("/v1/users/erin/data", headers=a.auth("admin"))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "object": "erasure",
        "user_id": "erin",
        "feedback_deleted": 2,
        "interactions_deleted": 1,
        "datasets_deleted": 1,
        "adapter_versions_flagged": 1,
    }
    async with create_sessionmaker(backend.engine)() as s:
        a_feedback = list(await s.scalars(select(Feedback).where(Feedback.tenant_id == a.id)))
        assert {f.user_id for f in a_feedback} == {"frank"}
        assert await s.get(Interaction, erins) is None
        b_users = await s.scalars(select(Feedback.user_id).where(Feedback.tenant_id == b.id))
        assert set(b_users) == {"erin"}  # tenant B's erin is another person
    assert not dataset_dir.exists()
    # Nothing of erin is left to read: the export, the versions' reports.
    export = (await client.get("/v1/export", headers=a.auth("admin"))).text
    assert SECRET not in export and "frank-question" in export
    versions = (await client.get("/v1/adapters", headers=a.auth("admin"))).json()["data"]
    (version,) = [v for v in versions if v["id"] == version_id]
    assert version["erased_data_at"] is not None and version["eval_report"]["samples"] == []
    assert json.dumps(versions).find(SECRET) == -1
    # Nothing is left to erase the second time; a product key cannot erase.
    again = await client.delete("/v1/users/erin/data", headers=a.auth("admin"))
    assert again.status_code == 404 and "nothing to erase" in again.json()["error"]["message"]
    assert (await client.delete("/v1/users/frank/data", headers=a.auth())).status_code == 403


async def test_files_it_cannot_delete_erase_nothing(
    client: httpx.AsyncClient,
    tenant: TenantKeys,
    backend: Backend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An API pod whose data volume is read-only: the erasure must not report success while the
    # user's text stays on disk.
    await _rate(client, tenant, "erin", SECRET)
    await _trained_on_everything(backend, tenant, tmp_path)
    monkeypatch.setattr(erasure, "_remove", lambda paths: [str(p) for p in paths])
    r = await client.delete("/v1/users/erin/data", headers=tenant.auth("admin"))
    assert r.status_code == 503 and "nothing was erased" in r.json()["error"]["message"]
    assert str(tmp_path) not in r.text  # where is the operator's business
    async with create_sessionmaker(backend.engine)() as s:
        users = await s.scalars(select(Feedback.user_id).where(Feedback.tenant_id == tenant.id))
        assert set(users) == {"erin"}
