"""Replaying recorded histories: an edit that changes what the workflow does for the same
events (non-determinism) fails here instead of in production. After an intended change,
re-record with ``python -m tests.workflows.record_history``."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.personalize import PersonalizeTenant

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_is_a_history_to_replay() -> None:
    assert HISTORIES, "record one with python -m tests.workflows.record_history"


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_workflow_replays_its_recorded_history(path: Path) -> None:
    history = WorkflowHistory.from_json("recorded", path.read_text())
    await Replayer(workflows=[PersonalizeTenant]).replay_workflow(history)
