"""Shared fixtures: the tiny model built once per session, synthetic feedback factories."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer import FeedbackRecord, compile_feedback, resolve_base_model
from trainer.compiler import CompiledDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach a hub

QUESTIONS = (
    "How do I reset my password?",
    "How do I get a refund for my order?",
    "What plans do you offer?",
    "How can I change my billing email?",
    "Where do I find my invoice?",
    "How do I cancel my subscription?",
    "Can I add another user to my account?",
    "How do I export my data?",
    "Why was my card declined?",
    "How do I contact support?",
    "What is your uptime guarantee?",
    "How do I turn on two-factor login?",
)
GOOD = "Sure! Open Settings, choose the item, then press the button. Done."
BAD = "No. No. No idea at all, figure it out yourself, not my problem, no no no."


def make_records(
    n_prompts: int = 24,
    *,
    good: str = GOOD,
    bad: str = BAD,
    up: bool = True,
    down: bool = True,
) -> list[FeedbackRecord]:
    """One up-voted and one down-voted answer per prompt (prompts are distinct)."""
    records: list[FeedbackRecord] = []
    for i in range(n_prompts):
        q = QUESTIONS[i % len(QUESTIONS)]
        messages = [{"role": "user", "content": f"{q} (ticket {i})"}]
        if up:
            records.append(FeedbackRecord(messages, good, 1, user_id=f"u{i}"))
        if down:
            records.append(FeedbackRecord(messages, bad, -1, user_id=f"v{i}"))
    return records


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with tiny-random materialized once for the whole session."""
    d = tmp_path_factory.mktemp("tuneloop-data")
    resolve_base_model("tiny-random", data_dir=d)
    return d


@pytest.fixture(scope="session")
def records() -> list[FeedbackRecord]:
    return make_records(48)


@pytest.fixture(scope="session")
def compiled(records: list[FeedbackRecord]) -> CompiledDataset:
    return compile_feedback(records, holdout_fraction=0.25)


@pytest.fixture(scope="session")
def records_factory() -> Callable[..., list[FeedbackRecord]]:
    return make_records
