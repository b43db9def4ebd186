"""The compile activity is bounded: adversarial text cannot stall the worker's event loop, a
flood of feedback is read newest first within a budget, and unrated traffic becomes evaluation
questions. Run through the SDK's activity environment on the real (migrated) databases."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from core.models import Feedback, Interaction, TrainingRun
from tests.conftest import Backend, TenantKeys
from workflows import activities as activities_module
from workflows.activities import PersonalizationActivities
from workflows.contracts import CompileInput


def _activities(backend: Backend, tmp_path: Path) -> PersonalizationActivities:
    return PersonalizationActivities(
        sessionmaker=create_sessionmaker(backend.engine),
        store=ArtifactStore(tmp_path / "artifacts"),
        data_dir=tmp_path,
    )


async def _seed(backend: Backend, tenant_id: str, rows: list[dict[str, Any]]) -> str:
    """Feedback rows (in the order given, oldest first) and a run to compile for."""
    async with create_sessionmaker(backend.engine)() as session:
        run = TrainingRun(tenant_id=tenant_id)
        session.add(run)
        for row in rows:
            session.add(Feedback(tenant_id=tenant_id, **row))
            # Ids start with the millisecond of their insert: one row per millisecond keeps
            # the rows in the order given.
            await session.flush()
            await asyncio.sleep(0.002)
        await session.commit()
        return run.id


def _thumb(i: int, *, text: str = "") -> dict[str, Any]:
    return {
        "prompt": f"question {i}: how do I water plant number {i}?{text}",
        "completion": f"Water it {'once' if i % 2 else 'twice'} a week.{text}",
        "rating": 1 if i % 2 else -1,
        "user_id": f"user-{i % 3}",
    }


async def test_adversarial_text_compiles_in_seconds_off_the_event_loop(
    backend: Backend, tenant: TenantKeys, tmp_path: Path
) -> None:
    # What one product key could post: patterns that a backtracking scrubber rescans from
    # every start (64 KiB of "sk-" took 13 s), 2 MiB of them in all.
    key = " and my key is sk-proj-AbCdEf1234567890XyZ12345"
    bad = [unit * (64_000 // len(unit)) + key for unit in ("sk-", "a.", "+1-", "a@")]
    rows = [_thumb(i, text=bad[i % 4] if i < 32 else "") for i in range(40)]
    run_id = await _seed(backend, tenant.id, rows)
    acts = _activities(backend, tmp_path)

    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    t0 = time.monotonic()
    out = await ActivityEnvironment().run(
        acts.compile_dataset, CompileInput(tenant.id, run_id, min_feedback=8)
    )
    took = time.monotonic() - t0
    tick.cancel()
    assert took < 20, f"compile took {took:.1f} s"
    # The loop kept turning: other tenants' activities on this worker were not held up.
    assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.2f} s"
    assert out.counts["records_used"] == 40
    card = json.loads((Path(out.dataset_dir) / "data_card.json").read_text())
    # The key hidden in each adversarial question and answer is still found.
    assert card["pii_found"]["secret"] == 64
    assert key.split()[-1] not in (Path(out.dataset_dir) / "kto_train.jsonl").read_text()


async def test_a_flood_is_read_newest_first_within_the_budget(
    backend: Backend, tenant: TenantKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activities_module, "MAX_COMPILE_RECORDS", 12)
    run_id = await _seed(backend, tenant.id, [_thumb(i) for i in range(16)])
    out = await ActivityEnvironment().run(
        _activities(backend, tmp_path).compile_dataset,
        CompileInput(tenant.id, run_id, min_feedback=8),
    )
    assert out.counts["records_left_out"] == 4 and out.counts["records_in"] == 12
    kept = (Path(out.dataset_dir) / "kto_train.jsonl").read_text() + (
        Path(out.dataset_dir) / "kto_holdout.jsonl"
    ).read_text()
    # The four oldest questions are the ones left out.
    assert "question 3:" not in kept and "question 4:" in kept and "question 15:" in kept


async def test_unrated_traffic_becomes_evaluation_questions(
    backend: Backend, tenant: TenantKeys, tmp_path: Path
) -> None:
    def conversation(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    async with create_sessionmaker(backend.engine)() as session:
        rated = Interaction(
            tenant_id=tenant.id,
            model="default",
            messages=conversation("rated question?"),
            completion="An answer.",
        )
        session.add(rated)
        for text in ("never rated?", "never rated?", "x" * 20_000, "mail me at a@b.example?"):
            session.add(
                Interaction(
                    tenant_id=tenant.id,
                    model="default",
                    messages=conversation(text),
                    completion="An answer.",
                )
            )
        await session.commit()
    run_id = await _seed(
        backend,
        tenant.id,
        [*(_thumb(i) for i in range(10)), {"interaction_id": rated.id, "rating": 1}],
    )
    out = await ActivityEnvironment().run(
        _activities(backend, tmp_path).compile_dataset,
        CompileInput(tenant.id, run_id, min_feedback=8),
    )
    lines = (Path(out.dataset_dir) / "eval_prompts.jsonl").read_text().splitlines()
    questions = sorted(json.loads(line)["prompt"][0]["content"] for line in lines)
    # Deduplicated, scrubbed, never a rated question, and no 20,000-character one.
    assert questions == ["mail me at [EMAIL]?", "never rated?"]
    assert out.counts["eval_prompts"] == 2
