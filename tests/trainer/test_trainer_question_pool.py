"""The simulated users' question pool (``trainer/data/questions.jsonl``) is big, varied and sane.

An answer counts as relevant to a question when one of its words starts with one of the
question's keyword stems, so the stems must be specific: no generic words, nothing too short.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from typing import Any

import pytest

MIN_QUESTIONS = 330
MIN_TOPICS = 30
MAX_PER_TOPIC = 20

# Stems that would make almost any answer look relevant.
GENERIC = frozenset(
    {
        "use",
        "make",
        "good",
        "time",
        "step",
        "help",
        "thing",
        "way",
        "can",
        "need",
        "get",
        "know",
        "want",
        "like",
        "just",
        "also",
        "the",
        "and",
        "you",
        "your",
        "how",
        "what",
        "why",
        "one",
        "all",
        "some",
        "more",
        "very",
        "first",
        "then",
        "sure",
        "here",
        "there",
        "this",
        "that",
        "with",
        "well",
        "try",
        "important",
        "best",
        "tip",
        "question",
        "answer",
    }
)


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z]+", text.lower()) if w]


@pytest.fixture(scope="module")
def pool() -> list[dict[str, Any]]:
    text = resources.files("trainer").joinpath("data/questions.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_rows_have_the_expected_shape(pool: list[dict[str, Any]]) -> None:
    for row in pool:
        assert set(row) == {"question", "topic", "keywords"}, row
        assert isinstance(row["question"], str) and row["question"].strip(), row
        assert isinstance(row["topic"], str) and row["topic"].strip(), row
        assert isinstance(row["keywords"], list), row


def test_enough_distinct_questions(pool: list[dict[str, Any]]) -> None:
    questions = [row["question"].strip().lower() for row in pool]
    assert len(questions) >= MIN_QUESTIONS
    dupes = [q for q, n in Counter(questions).items() if n > 1]
    assert not dupes


def test_questions_are_short_natural_sentences(pool: list[dict[str, Any]]) -> None:
    for row in pool:
        assert 5 <= len(row["question"].split()) <= 20, row["question"]


def test_topics_are_many_and_balanced(pool: list[dict[str, Any]]) -> None:
    per_topic = Counter(row["topic"] for row in pool)
    assert len(per_topic) >= MIN_TOPICS
    crowded = {t: n for t, n in per_topic.items() if n > MAX_PER_TOPIC}
    assert not crowded


def test_keywords_are_specific_lowercase_stems(pool: list[dict[str, Any]]) -> None:
    for row in pool:
        keywords = row["keywords"]
        assert 3 <= len(keywords) <= 6, row
        assert len(set(keywords)) == len(keywords), row
        for kw in keywords:
            assert isinstance(kw, str) and kw.strip() == kw and kw, row
            assert kw == kw.lower(), row
            # answers are split on non-letters, so a stem with anything else could never match
            assert re.fullmatch(r"[a-z]+", kw), row
            assert len(kw) >= 3, row
            assert kw not in GENERIC, row


def test_each_question_mentions_its_keywords_or_topic(pool: list[dict[str, Any]]) -> None:
    for row in pool:
        stems = list(row["keywords"]) + _words(row["topic"])
        words = _words(row["question"])
        assert any(w.startswith(s) for w in words for s in stems), row
