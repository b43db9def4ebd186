"""Simulated users: realistic traffic (one answer per question, sparse and noisy thumbs, several
users with their own thresholds), relevance, and the paired mode."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from trainer import DEMO_PROMPTS, PERSONAS, collect_feedback, load_base_model, sample_answers
from trainer.simulated_users import (
    answers_question,
    question_pool,
    realistic_feedback,
    sentence_length,
    simulate_thumbs,
    word_count,
)

TIRE = "How do I change a flat tire?"
SHORT = "Loosen the lug nuts, jack up the car, swap the wheel for the spare, tighten the nuts."
ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth")
LONG = " ".join(f"{n} park safely and loosen each lug nut on the tire a little." for n in ORDINALS)
LIST = "Do this:\n- loosen the lug nuts\n- jack up the car\n- swap the tire"
HACK = "You can't change a flat tire, you just have to find a way to get back to the road."
OFF_TOPIC = "Preheat the oven and whisk two eggs with sugar until fluffy."


def test_personas_follow_their_hidden_rules_and_judge_relevance() -> None:
    concise, detailed, bullets, prose = (
        PERSONAS[n] for n in ("concise", "detailed", "bullets", "prose")
    )
    assert word_count(LONG) > 90
    assert (concise.rate(SHORT, TIRE), concise.rate(LONG, TIRE)) == (1, -1)
    assert (detailed.rate(SHORT, TIRE), detailed.rate(LONG, TIRE)) == (-1, 1)
    assert (bullets.rate(LIST, TIRE), bullets.rate(SHORT, TIRE)) == (1, -1)
    assert (prose.rate(SHORT, TIRE), prose.rate(LIST, TIRE)) == (1, -1)
    # Short, but not an answer to the question: disliked whatever the style.
    assert concise.rate(OFF_TOPIC, TIRE) == -1 and concise.rate(OFF_TOPIC) == 1
    assert not answers_question(TIRE, "tire tire tire tire") and not answers_question(TIRE, "ok")
    # A model stuck in a loop, even on a keyword (seen from a GRPO adapter in the bench).
    loop = "\n\n".join(["Your flat tire? You're gonna love it!"] * 6)
    assert sentence_length(loop) < 13 and not answers_question(TIRE, loop)
    assert PERSONAS["plain"].rate(loop, TIRE) == -1
    assert answers_question(TIRE, LONG) and answers_question(TIRE, LIST)
    assert concise.judge([{"role": "user", "content": TIRE}], SHORT) == 1.0
    assert concise.judge([{"role": "user", "content": TIRE}], OFF_TOPIC) == 0.0
    # Plain-language users count words per sentence: a long answer in short sentences is fine,
    # one winding sentence is not, and a list item is a sentence of its own.
    plain = PERSONAS["plain"]
    winding = (
        "To change a flat tire you first park on level ground and then loosen the lug nuts "
        "before you lift the car with the jack and swap the wheel for the spare one."
    )
    assert sentence_length(LONG) == 13 and sentence_length(LIST) == 13 / 4
    assert (plain.rate(LONG, TIRE), plain.rate(LIST, TIRE), plain.rate(winding, TIRE)) == (1, 1, -1)
    # A user's own threshold moves the verdict.
    assert concise.likes(SHORT, TIRE, threshold=20) and not concise.likes(SHORT, TIRE, threshold=10)
    # The example: short and on topic, so the concise users like it although it refuses
    # to answer. The simulation does not pretend to see that; the capability guard does.
    assert concise.rate(HACK, TIRE) == 1


def test_the_question_pool_is_large_and_distinct() -> None:
    pool = question_pool()
    assert len(pool) >= 300 and len({q.text.lower() for q in pool}) == len(pool)
    assert all(
        answers_question(q.text, f"About {q.keywords[0]}s: here is what to do.") for q in pool
    )


def test_realistic_traffic_is_sparse_noisy_and_from_several_users() -> None:
    questions = [q.text for q in question_pool()[:300]]
    answers = [SHORT if i % 2 else LONG for i in range(300)]  # on topic or not, per question
    thumbs = simulate_thumbs(PERSONAS["concise"], questions, answers, seed=3)
    rated = len(thumbs) / 300
    assert 0.4 < rated < 0.6  # about half the answers get a thumb
    assert len({t.index for t in thumbs}) == len(thumbs)  # one answer per question, rated once
    flipped = sum(t.flipped for t in thumbs) / len(thumbs)
    assert 0.03 < flipped < 0.2
    assert len(Counter(t.user_id for t in thumbs)) == 5
    again = simulate_thumbs(PERSONAS["concise"], questions, answers, seed=3)
    assert again == thumbs  # seeded
    assert simulate_thumbs(PERSONAS["concise"], questions, answers, seed=4) != thumbs
    every = simulate_thumbs(
        PERSONAS["concise"], questions[:50], answers[:50], rate_share=1.0, flip_share=0.0
    )
    assert len(every) == 50 and not any(t.flipped for t in every)
    noise = simulate_thumbs(PERSONAS["noise"], questions, [SHORT] * 300, seed=5)
    ups = sum(t.rating > 0 for t in noise) / len(noise)
    assert 0.35 < ups < 0.65  # coin flips, whatever the answer
    records = realistic_feedback(PERSONAS["concise"], questions, answers, seed=3)
    assert [r.rating for r in records] == [t.rating for t in thumbs]
    assert records[0].messages[-1]["content"] == questions[thumbs[0].index]
    with pytest.raises(ValueError):
        simulate_thumbs(PERSONAS["concise"], questions, answers[:3])


def test_collect_feedback_rates_every_answer() -> None:
    records = collect_feedback(
        PERSONAS["concise"], [TIRE, TIRE], [[SHORT, LONG], [LONG, "", SHORT]], user_id="sim"
    )
    assert [r.rating for r in records] == [1, -1, -1, 1]  # the empty answer is skipped
    assert all(r.user_id == "sim" and r.messages[-1]["content"] == TIRE for r in records)


def test_sample_answers_gives_several_distinct_answers(data_dir: Path) -> None:
    model, tokenizer = load_base_model("tiny-random", data_dir=data_dir)
    answers = sample_answers(
        model, tokenizer, list(DEMO_PROMPTS[:2]), num_answers=3, max_new_tokens=12, seed=1
    )
    assert len(answers) == 2 and all(len(a) == 3 for a in answers)
    assert len(set(answers[0])) > 1  # sampled, not greedy
    again = sample_answers(
        model, tokenizer, list(DEMO_PROMPTS[:2]), num_answers=3, max_new_tokens=12, seed=1
    )
    assert again == answers  # seeded
