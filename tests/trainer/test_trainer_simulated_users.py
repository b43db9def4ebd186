"""Simulated users: hidden rules, votes on sampled answers."""

from __future__ import annotations

from pathlib import Path

from trainer import DEMO_PROMPTS, PERSONAS, collect_feedback, load_base_model, sample_answers
from trainer.simulated_users import word_count

SHORT = "Open Settings and press Reset."
LONG = " ".join(["This answer explains every detail carefully."] * 15)
BULLETS = "Do this:\n- open the app\n- press reset\n- confirm"


def test_personas_follow_their_hidden_rules() -> None:
    concise, detailed, bullets = PERSONAS["concise"], PERSONAS["detailed"], PERSONAS["bullets"]
    assert word_count(LONG) > 80
    assert (concise.rate(SHORT), concise.rate(LONG)) == (1, -1)
    assert (detailed.rate(SHORT), detailed.rate(LONG)) == (-1, 1)
    assert (bullets.rate(BULLETS), bullets.rate(SHORT)) == (1, -1)
    assert bullets.rate("1. first\n2. second") == 1
    assert concise.rate("") == -1
    assert concise.judge([], SHORT) == 1.0 and detailed.judge([], SHORT) == 0.0


def test_collect_feedback_rates_every_answer() -> None:
    records = collect_feedback(
        PERSONAS["concise"], ["q1", "q2"], [[SHORT, LONG], [LONG, "", SHORT]], user_id="sim"
    )
    assert [r.rating for r in records] == [1, -1, -1, 1]  # the empty answer is skipped
    assert all(r.user_id == "sim" and r.messages[-1]["content"] in ("q1", "q2") for r in records)


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
