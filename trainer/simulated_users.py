"""Simulated users: tenants whose end users have a hidden taste, for the demo, the benchmark and
the workflow tests.

**Realistic traffic** is the default (:func:`simulate_thumbs`): every question is asked once, from
a pool of distinct questions the project wrote (``data/questions.jsonl``), and gets one answer; a
share of the answers is rated (default 50 %), a share of the ratings is flipped (default 10 %:
users are not consistent), and a tenant has several users, each with a threshold of their own.
That is what a product's logs look like: no pairs, sparse and noisy thumbs.

Every persona also judges **relevance**: an answer that does not address the question (none of
the question's keywords), or a degenerate one (a few words, one word or one sentence repeated),
is disliked whatever its style. A judge that rewards a short non-answer would reward exactly
the reward hacking the gate is there to stop.

The paired mode (:func:`collect_feedback`: several sampled answers per question, all rated) stays
for experiments that want DPO pairs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any, Literal

from trainer.compiler import FeedbackRecord
from trainer.text_measures import list_items, markup_marks, sentences, word_count, words

__all__ = [
    "DEMO_PROMPTS",
    "PERSONAS",
    "Persona",
    "Question",
    "SimUser",
    "Thumb",
    "answers_question",
    "collect_feedback",
    "get_persona",
    "list_items",
    "question_pool",
    "realistic_feedback",
    "sample_answers",
    "simulate_thumbs",
    "word_count",
]

_LETTERS = re.compile(r"[a-z]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "can",
        "could",
        "do",
        "does",
        "for",
        "from",
        "have",
        "how",
        "i",
        "in",
        "is",
        "it",
        "my",
        "of",
        "on",
        "or",
        "should",
        "the",
        "to",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "me",
        "we",
        "our",
        "about",
        "into",
        "best",
        "good",
        "way",
        "ways",
        "some",
        "any",
        "tell",
        "explain",
        "give",
        "get",
        "make",
        "use",
        "using",
        "there",
        "this",
        "that",
        "these",
        "those",
        "than",
        "then",
        "more",
        "most",
        "much",
        "many",
        "very",
        "just",
        "also",
        "like",
        "need",
        "want",
        "know",
        "really",
        "easy",
        "easiest",
        "quick",
        "quickly",
    ]
)


def _markup(text: str) -> int:
    """List items plus markdown emphasis and headings: what a reader of plain prose dislikes."""
    return list_items(text) + markup_marks(text)


def sentence_length(text: str) -> float:
    """Mean words per sentence: plain-language guides ask for about 15-20."""
    found = sentences(text)
    return word_count(text) / len(found) if found else 0.0


@dataclass(frozen=True)
class Question:
    text: str
    topic: str
    keywords: tuple[str, ...]
    """Word stems an answer that addresses the question very likely contains one of."""


@cache
def question_pool() -> tuple[Question, ...]:
    """The project's own pool of distinct everyday questions (``data/questions.jsonl``)."""
    raw = resources.files("trainer").joinpath("data/questions.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return tuple(Question(r["question"], r["topic"], tuple(r["keywords"])) for r in rows)


@cache
def _keywords_by_text() -> dict[str, tuple[str, ...]]:
    return {q.text: q.keywords for q in question_pool()}


def _keywords(question: str) -> tuple[str, ...]:
    """The pool's keywords for a pool question; else the question's own content words."""
    known = _keywords_by_text().get(question.strip())
    if known is not None:
        return known
    words = [w for w in _LETTERS.findall(question.lower()) if len(w) >= 4 and w not in _STOP]
    return tuple(w[:6] for w in words)


def _degenerate(answer: str) -> bool:
    """A few words, one word over and over, or a few sentences over and over: half of them or
    more repeats (a looping model: "Dude, you're gonna love it!" nine times; a keyword of the
    question slips into such a loop as easily)."""
    said = [w.lower() for w in words(answer)]
    if len(said) < 3:
        return True
    top = Counter(said).most_common(1)[0][1]
    if len(said) >= 4 and top / len(said) > 0.5:
        return True
    lines = [" ".join(w.lower() for w in words(s)) for s in sentences(answer)]
    return len(lines) >= 3 and len(set(lines)) <= len(lines) / 2


def answers_question(question: str | None, answer: str) -> bool:
    """Whether ``answer`` addresses ``question``: not degenerate, and (when the question is
    known) some word of it starts with one of the question's keywords."""
    if _degenerate(answer):
        return False
    if question is None:
        return True
    stems = _keywords(question)
    if not stems:
        return True
    return any(w.startswith(stems) for w in _LETTERS.findall(answer.lower()))


@dataclass(frozen=True)
class SimUser:
    """One end user of a tenant: the persona's taste with a threshold of their own."""

    user_id: str
    threshold: float


@dataclass(frozen=True)
class Persona:
    """A tenant's users: a style they measure answers by, and the range their thresholds span.

    A user likes an answer when it addresses the question and its style measure is at most
    (``at_most``) or at least (``at_least``) the user's threshold; ``coin`` users vote at
    random (the noise tenant a gate must never promote for).
    """

    name: str
    description: str
    style: Callable[[str], float]
    liked_when: Literal["at_most", "at_least", "coin"]
    thresholds: tuple[float, float]
    """Users' thresholds are drawn uniformly from this range (rounded for counts)."""
    integer: bool = False

    @property
    def typical(self) -> float:
        """The middle user's threshold: the persona's taste as one rule."""
        lo, hi = self.thresholds
        mid = (lo + hi) / 2
        return float(round(mid)) if self.integer else mid

    def users(self, n: int, rng: random.Random, *, prefix: str = "user") -> list[SimUser]:
        lo, hi = self.thresholds
        out = []
        for i in range(n):
            t = rng.uniform(lo, hi)
            out.append(SimUser(f"{prefix}-{i}", float(round(t)) if self.integer else t))
        return out

    def likes(
        self, answer: str, question: str | None = None, *, threshold: float | None = None
    ) -> bool:
        """Whether a user (the typical one unless ``threshold``) likes ``answer``."""
        if self.liked_when == "coin":
            digest = hashlib.sha256(f"{question}\0{answer}\0{threshold}".encode()).digest()
            return digest[0] % 2 == 0
        if not answers_question(question, answer):
            return False
        t = self.typical if threshold is None else threshold
        value = self.style(answer)
        return value <= t if self.liked_when == "at_most" else value >= t

    def rate(
        self, answer: str, question: str | None = None, *, threshold: float | None = None
    ) -> int:
        """Thumbs: +1 if liked, else -1."""
        return 1 if self.likes(answer, question, threshold=threshold) else -1

    def judge(self, messages: Sequence[Mapping[str, str]], answer: str) -> float:
        """The typical user as an evaluation judge (1.0 liked, 0.0 not), relevance included."""
        question = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), None)
        return 1.0 if self.likes(answer, question) else 0.0


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        # Thresholds sit inside the answers a small chat model gives (SmolLM2: 57-83 words for
        # the middle 80 %, a list in one answer of seven), so its users have real choices.
        Persona(
            "concise",
            "likes the shorter answers: at most 55-75 words, depending on the user",
            word_count,
            "at_most",
            (55, 75),
        ),
        Persona(
            "bullets",
            "likes answers laid out as a list: at least 2-3 items, depending on the user",
            list_items,
            "at_least",
            (2, 3),
            integer=True,
        ),
        Persona(
            "prose",
            "likes plain prose: no lists, headings or bold (some users accept one item)",
            _markup,
            "at_most",
            (0, 1),
            integer=True,
        ),
        Persona(
            "plain",
            "likes plain language: sentences of at most 13-19 words on average, by user",
            sentence_length,
            "at_most",
            (13, 19),
        ),
        Persona(
            "detailed",
            "likes long answers: at least 60-90 words, depending on the user",
            word_count,
            "at_least",
            (60, 90),
        ),
        Persona("noise", "votes at random: a coin flip per answer", word_count, "coin", (0, 0)),
    )
}


def get_persona(name: str) -> Persona:
    try:
        return PERSONAS[name]
    except KeyError:
        raise KeyError(f"unknown persona {name!r}; known: {', '.join(PERSONAS)}") from None


@dataclass(frozen=True)
class Thumb:
    """One simulated vote on the answer at ``index``."""

    index: int
    user_id: str
    rating: int
    flipped: bool = False


def simulate_thumbs(
    persona: Persona,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    rate_share: float = 0.5,
    flip_share: float = 0.1,
    n_users: int = 5,
    seed: int = 0,
    user_prefix: str | None = None,
) -> list[Thumb]:
    """Realistic feedback on served traffic: ``answers[i]`` is the one answer to
    ``questions[i]``; each was asked by one of the tenant's users, who rates it with probability
    ``rate_share``; a rating is flipped with probability ``flip_share``."""
    if len(questions) != len(answers):
        raise ValueError("need exactly one answer per question")
    if not 0.0 < rate_share <= 1.0 or not 0.0 <= flip_share < 0.5:
        raise ValueError("rate_share must be in (0, 1] and flip_share in [0, 0.5)")
    if n_users < 1:
        raise ValueError("a tenant needs at least one user")
    rng = random.Random(f"{persona.name}:{seed}")
    users = persona.users(n_users, rng, prefix=user_prefix or f"sim-{persona.name}")
    thumbs: list[Thumb] = []
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        user = rng.choice(users)
        rated, flip, coin = rng.random() < rate_share, rng.random() < flip_share, rng.random()
        if not rated or not answer.strip():
            continue
        if persona.liked_when == "coin":
            rating = 1 if coin < 0.5 else -1
        else:
            rating = persona.rate(answer, question, threshold=user.threshold)
        thumbs.append(Thumb(i, user.user_id, -rating if flip else rating, flip))
    return thumbs


def realistic_feedback(
    persona: Persona,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    system_prompt: str | None = None,
    **options: Any,
) -> list[FeedbackRecord]:
    """:func:`simulate_thumbs` as feedback records (options: ``rate_share``, ``flip_share``,
    ``n_users``, ``seed``)."""
    now = datetime.now(UTC)
    records = []
    for t in simulate_thumbs(persona, questions, answers, **options):
        messages: list[dict[str, str]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": questions[t.index]})
        records.append(
            FeedbackRecord(
                messages=messages,
                completion=answers[t.index],
                rating=t.rating,
                user_id=t.user_id,
                created_at=now,
            )
        )
    return records


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
    """Paired mode: rate every sampled answer, one :class:`FeedbackRecord` per (prompt, answer),
    by the persona's typical user (relevance included).

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
                    rating=persona.rate(answer, prompt),
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
