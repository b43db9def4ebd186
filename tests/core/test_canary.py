"""The live canary's decision rule (``core/canary.py``): its probability, its looks, and how often
it promotes a candidate that is not better."""

from __future__ import annotations

import random

import numpy as np
import pytest

from core.canary import Arm, CanaryRule, decide, design_effect, in_canary, p_better


@pytest.mark.parametrize(
    ("candidate", "current"),
    [(Arm(20, 10), Arm(10, 20)), (Arm(3, 0), Arm(0, 0)), (Arm(140, 60), Arm(600, 400))],
)
def test_p_better_is_the_beta_posterior_probability(candidate: Arm, current: Arm) -> None:
    rng = np.random.default_rng(0)
    draws = 400_000
    sampled = np.mean(
        rng.beta(candidate.up + 1, candidate.down + 1, draws)
        > rng.beta(current.up + 1, current.down + 1, draws)
    )
    assert p_better(candidate, current) == pytest.approx(sampled, abs=0.003)
    assert p_better(candidate, current) + p_better(current, candidate) == pytest.approx(1.0)


def test_equal_arms_are_a_coin_and_many_thumbs_do_not_overflow() -> None:
    assert p_better(Arm(7, 7), Arm(7, 7)) == pytest.approx(0.5)
    assert p_better(Arm(5000, 5000), Arm(5000, 5000)) == pytest.approx(0.5, abs=1e-6)
    assert p_better(Arm(5200, 4800), Arm(4800, 5200)) > 0.999


def test_the_rule_waits_for_thumbs_then_looks_at_doublings() -> None:
    rule = CanaryRule(min_thumbs=30)
    early = decide(Arm(50, 10), Arm(29, 0), rule)
    assert early.action == "wait" and early.looks_done == 0 and "30 thumbs" in early.reason
    # 30 thumbs each, candidate a little ahead: look 1 spends alpha/2 and does not decide.
    first = decide(Arm(18, 12), Arm(21, 9), rule)
    assert first.action == "wait" and first.looks_done == 1 and "60 thumbs" in first.reason
    assert first.p_better is not None and 0.5 < first.p_better < 0.975
    assert first.p_better == p_better(Arm(21, 9), Arm(18, 12))
    # Same thumbs again: no new look is due, so nothing is spent.
    assert decide(Arm(18, 12), Arm(21, 9), rule, looks_done=1).looks_done == 1
    # A late poll with 130 thumbs each: looks 2 and 3 are due; only the strictest is taken.
    late = decide(Arm(65, 65), Arm(70, 60), rule, looks_done=1)
    assert late.looks_done == 3 and late.action == "wait"


def test_clear_winners_are_promoted_and_clear_losers_rolled_back() -> None:
    win = decide(Arm(70, 50), Arm(27, 3))
    assert win.action == "promote" and win.p_better is not None and win.p_better > 0.975
    assert "look 1" in win.reason and "27/30 up" in win.reason
    lose = decide(Arm(70, 50), Arm(8, 22))
    assert lose.action == "rollback" and lose.p_better is not None and lose.p_better < 0.025


def test_time_up_keeps_the_current_version_and_says_why() -> None:
    verdict = decide(Arm(40, 20), Arm(6, 4), expired=True)
    assert verdict.action == "expire" and "current version stays" in verdict.reason
    assert "6/10 up" in verdict.reason


def test_failing_or_slow_answers_roll_back_without_waiting_for_thumbs() -> None:
    healthy = Arm(0, 0, requests=500, errors=2, p95_ms=900.0)
    failing = decide(healthy, Arm(1, 0, requests=60, errors=5, p95_ms=900.0))
    assert failing.action == "rollback" and "failed 8.3% of 60 requests" in failing.reason
    slow = decide(healthy, Arm(1, 0, requests=60, errors=0, p95_ms=1800.0))
    assert slow.action == "rollback" and "2.00x" in slow.reason
    # Too few requests to judge yet.
    assert decide(healthy, Arm(1, 0, requests=10, errors=5)).action == "wait"


def test_thumbs_from_the_same_users_count_for_less() -> None:
    one_each = [(1, 0)] * 60 + [(0, 1)] * 40  # 100 users, one thumb each: independent
    assert design_effect(one_each) == pytest.approx(100 / 99)
    # 20 users who each always like or always dislike: 200 thumbs hold 20 users' worth.
    all_or_nothing = [(10, 0)] * 12 + [(0, 10)] * 8
    assert design_effect(all_or_nothing) == pytest.approx(10 * 20 / 19)
    assert design_effect([]) == design_effect([(5, 0)]) == design_effect([(3, 0), (2, 0)]) == 1.0
    # The same 27 of 30 ups decide when independent, and wait when they come from 3 users.
    current = Arm(70, 50)
    assert decide(current, Arm(27, 3)).action == "promote"
    clustered = Arm(27, 3, design_effect=10 * 3 / 2)
    assert clustered.effective() == (2, 0)
    assert decide(current, clustered).action == "wait"


def test_a_user_stays_on_one_arm_and_the_share_is_the_fraction() -> None:
    users = [f"user-{i}" for i in range(4000)]
    first = [in_canary(u, 0.2, salt="canary-1") for u in users]
    assert first == [in_canary(u, 0.2, salt="canary-1") for u in users]  # stable
    assert 0.18 < sum(first) / len(users) < 0.22
    other = [in_canary(u, 0.2, salt="canary-2") for u in users]
    assert 0.02 < sum(a and b for a, b in zip(first, other, strict=True)) / len(users) < 0.06
    assert not any(in_canary(u, 0.0, salt="x") for u in users)
    assert all(in_canary(u, 1.0, salt="x") for u in users)


def test_bad_rules_are_refused() -> None:
    for bad in (
        {"min_thumbs": 0},
        {"confidence": 1.0},
        {"confidence": 0.4},
        {"max_p95_ratio": 0.9},
    ):
        with pytest.raises(ValueError):
            CanaryRule(**bad)


def _canary(rate_current: float, rate_candidate: float, fraction: float, rng: random.Random) -> str:
    """One simulated canary: thumbs arrive one at a time on a random arm until a decision, or
    until 3,000 thumbs (the canary's time runs out)."""
    current, candidate, looks = [0, 0], [0, 0], 0
    for _ in range(3000):
        arm, rate = (
            (candidate, rate_candidate) if rng.random() < fraction else (current, rate_current)
        )
        arm[0 if rng.random() < rate else 1] += 1
        verdict = decide(Arm(*current), Arm(*candidate), looks_done=looks)
        if verdict.action != "wait":
            return verdict.action
        looks = verdict.looks_done
    return "expire"


def test_an_equal_candidate_is_rarely_promoted_however_often_the_rule_is_asked() -> None:
    # Asked after every thumb. Promoting at P >= 0.95 on each would promote ~27 % of these.
    rng = random.Random(7)
    outcomes = [_canary(0.6, 0.6, 0.3, rng) for _ in range(150)]
    assert outcomes.count("promote") / len(outcomes) <= 0.07, outcomes.count("promote")
    better = [_canary(0.6, 0.8, 0.3, rng) for _ in range(20)]
    assert better.count("promote") >= 19
