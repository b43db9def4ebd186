"""Simulated users: personas with a hidden taste that vote on answers, for demos and benchmarks.

A persona's rule is deliberately simple and checkable ("under 40 words"), so a benchmark can tell
whether an adapter learned it. ``collect_feedback`` samples several answers per prompt from a
model, so thumbs land on the model's own (realistic) answers, up and down alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from trainer.compiler import FeedbackRecord

__all__ = [
    "DEMO_PROMPTS",
    "PERSONAS",
    "Persona",
    "collect_feedback",
    "get_persona",
    "sample_answers",
    "word_count",
]

_WORD = re.compile(r"\b\w[\w'-]*\b")
_BULLET_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def _is_concise(text: str) -> bool:
    return 0 < word_count(text) < 40


def _is_detailed(text: str) -> bool:
    return word_count(text) > 80


def _has_bullets(text: str) -> bool:
    return len(_BULLET_LINE.findall(text)) >= 2


@dataclass(frozen=True)
class Persona:
    """A simulated end user with a hidden rule; ``likes(answer)`` is the rule."""

    name: str
    description: str
    likes: Callable[[str], bool]

    def rate(self, answer: str) -> int:
        """Thumbs: +1 if the answer follows the hidden rule, else -1."""
        return 1 if self.likes(answer) else -1

    def judge(self, messages: Sequence[Mapping[str, str]], answer: str) -> float:
        """The persona as an evaluation judge (1.0 liked, 0.0 not)."""
        return 1.0 if self.likes(answer) else 0.0


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona("concise", "likes answers under 40 words", _is_concise),
        Persona("detailed", "likes answers over 80 words", _is_detailed),
        Persona("bullets", "likes answers with a bulleted or numbered list", _has_bullets),
    )
}


def get_persona(name: str) -> Persona:
    try:
        return PERSONAS[name]
    except KeyError:
        raise KeyError(f"unknown persona {name!r}; known: {', '.join(PERSONAS)}") from None


DEMO_PROMPTS: tuple[str, ...] = (
    "How do I reset my password?",
    "What is the difference between a savings and a checking account?",
    "Give me some tips for staying productive when working from home.",
    "How should I prepare for a job interview?",
    "What are the benefits of regular exercise?",
    "How do I make a good cup of coffee?",
    "Explain what a budget is and why it matters.",
    "How can I improve my sleep?",
    "What should I pack for a weekend hiking trip?",
    "How do I write a polite email asking for a deadline extension?",
    "What is machine learning?",
    "How do I keep houseplants alive?",
    "What are some ways to reduce stress?",
    "How do I start learning a new language?",
    "What is the best way to organize my week?",
    "How can I save money on travel?",
    "Explain how a refund request works.",
    "What makes a good team meeting?",
    "How do I back up my computer?",
    "What should I consider when buying a used car?",
    "How do I give constructive feedback to a colleague?",
    "What is compound interest?",
    "How do I cook rice on the stove?",
    "What are good habits for healthy eating?",
    "How do I prepare for a presentation?",
    "Explain what cloud storage is.",
    "How can I be a better listener?",
    "What are the steps to plant a vegetable garden?",
    "How do I choose a strong password?",
    "What is the difference between weather and climate?",
    "How do I train a puppy to sit?",
    "What are some tips for writing a resume?",
    "How do I clean a laptop keyboard safely?",
    "What is a healthy morning routine?",
    "How do I deal with a difficult customer?",
    "What should I know before adopting a cat?",
    "How can I learn to code?",
    "What are the signs of burnout?",
    "How do I plan a birthday party?",
    "Explain what an API is.",
    "How do I negotiate a higher salary?",
    "What are some ways to be more environmentally friendly?",
    "How do I change a flat tire?",
    "What is a good way to study for exams?",
    "How do I set goals I can actually reach?",
    "What is inflation?",
    "How do I start running?",
    "How can I make my home more energy efficient?",
)


def collect_feedback(
    persona: Persona,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    user_id: str | None = None,
    system_prompt: str | None = None,
) -> list[FeedbackRecord]:
    """Rate every sampled answer: one :class:`FeedbackRecord` per (prompt, answer).

    ``answers[i]`` are the answers sampled for ``prompts[i]`` (see :func:`sample_answers`).
    """
    if len(prompts) != len(answers):
        raise ValueError("need one list of answers per prompt")
    now = datetime.now(UTC)
    records: list[FeedbackRecord] = []
    for prompt, options in zip(prompts, answers, strict=True):
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        for answer in options:
            if not answer.strip():
                continue
            records.append(
                FeedbackRecord(
                    messages=messages,
                    completion=answer,
                    rating=persona.rate(answer),
                    user_id=user_id or f"sim-{persona.name}",
                    created_at=now,
                )
            )
    return records


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    num_answers: int = 4,
    max_new_tokens: int = 160,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    adapter: str | None = None,
) -> list[list[str]]:
    """Sample ``num_answers`` answers per prompt (long enough for the personas to disagree)."""
    from trainer.generation import generate_answers

    return generate_answers(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for p in prompts],
        adapter=adapter,
        num_answers=num_answers,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
