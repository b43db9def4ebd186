"""The promotion gate reads each metric's interval on the conservative side."""

from __future__ import annotations

from typing import Any

import pytest

from trainer import EvalReport, GatePolicy, InvalidSpec, gate
from trainer.stats import auroc, paired_difference, proportion


def _report(
    *,
    thumbs: tuple[list[float], list[float]] | None = ([0.9] * 12, [0.1] * 12),
    judge_trusted: bool = True,
    wins: int = 40,
    n_win: int = 50,
    capability: tuple[list[float], list[float]] = (
        [1.0] * 60 + [0.0] * 20,
        [1.0] * 60 + [0.0] * 20,
    ),
    **kw: Any,
) -> EvalReport:
    r = EvalReport(candidate="c", current="base", regression_kl=0.05, regression_ppl_increase=0.02)
    if thumbs is not None:
        cand, cur = auroc(*thumbs), auroc([0.0] * len(thumbs[0]), [0.0] * len(thumbs[1]))
        r.tenant_metric, r.tenant_metric_note = "thumbs", "implicit-reward AUROC"
        r.ci["thumbs_auroc_candidate"], r.ci["thumbs_auroc_current"] = cand.to_dict(), cur.to_dict()
        r.pref_improvement, r.pref_improvement_low = cand.value - cur.value, cand.low - cur.value
    r.judge = {"trusted": judge_trusted, "reason": "judge AUROC 0.5 [0.3, 0.7] (n=20): chance"}
    r.judge_trusted = judge_trusted
    if judge_trusted and n_win:
        r.wins, r.losses, r.n_win_prompts = wins, n_win - wins, n_win
        r.ci["win_rate"] = proportion(wins, n_win).to_dict()
    base, cand_pass = capability
    drop = paired_difference(base, cand_pass)
    r.ci["capability_drop"] = drop.to_dict()
    r.capability_base, r.capability_candidate = sum(base) / len(base), sum(cand_pass) / len(base)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


@pytest.mark.parametrize(
    ("report_kw", "policy_kw", "promote", "failed"),
    [
        ({}, {}, True, None),
        # held-out thumbs the candidate cannot separate: its interval reaches below chance, so
        # on their own they do not show it better...
        ({"thumbs": ([0.6, 0.4] * 6, [0.5] * 12)}, {"min_win_rate": None}, False, "preference"),
        # ...but they do not contradict the trusted judge's win rate either
        ({"thumbs": ([0.6, 0.4] * 6, [0.5] * 12)}, {}, True, None),
        # ...unless the candidate was trained to please that judge (GRPO): then they must show it
        (
            {"thumbs": ([0.6, 0.4] * 6, [0.5] * 12), "judge_was_reward": True},
            {},
            False,
            "preference",
        ),
        ({"judge_was_reward": True}, {}, True, None),  # thumbs that show the lift suffice
        # ...and its judge's win rate alone is no evidence
        ({"judge_was_reward": True}, {"min_pref_improvement": None}, False, "win_rate"),
        # held-out thumbs that rank the candidate's taste backwards contradict any win rate
        ({"thumbs": ([0.1] * 12, [0.9] * 12)}, {}, False, "preference"),
        # without the judge's win rate, a wide tenant metric decides nothing
        ({"thumbs": ([0.6, 0.4] * 6, [0.5] * 12), "wins": 30}, {}, False, "preference"),
        ({"thumbs": None}, {}, False, "preference"),  # too little held-out data
        ({"thumbs": None}, {"min_pref_improvement": None}, True, None),
        ({"judge_trusted": False}, {}, False, "win_rate"),
        ({"judge_trusted": False}, {"min_win_rate": None}, True, None),
        ({"wins": 30}, {}, False, "win_rate"),  # 60 % of 50: the interval includes a tie
        ({"n_win": 0}, {}, False, "win_rate"),
        ({"wins": 30}, {"min_win_rate": 0.3}, True, None),  # min_win_rate is usable
        ({"capability": ([1.0] * 80, [1.0] * 66 + [0.0] * 14)}, {}, False, "capability"),
        ({"capability": ([1.0] * 80, [1.0] * 78 + [0.0] * 2)}, {}, True, None),
        (
            {"capability": ([1.0] * 80, [1.0] * 66 + [0.0] * 14)},
            {"max_capability_drop": None},
            True,
            None,
        ),
        ({"regression_kl": 0.9}, {}, False, "regression_kl"),
        ({"regression_ppl_increase": 0.5}, {}, False, "regression_ppl"),
        ({"regression_kl": 0.9}, {"max_regression_kl": None}, True, None),
    ],
)
def test_gate_decisions(
    report_kw: dict[str, Any], policy_kw: dict[str, Any], promote: bool, failed: str | None
) -> None:
    decision = gate(_report(**report_kw), GatePolicy(**policy_kw))
    assert decision.promote is promote, decision.reason
    if failed:
        assert decision.checks[failed] is False
        assert decision.reason.startswith("reject") and failed in decision.reason
    else:
        assert decision.reason.startswith("promote")


def test_reasons_carry_the_numbers_a_person_needs() -> None:
    ok = gate(_report(), GatePolicy())
    assert "win rate 0.800 [" in ok.reason and "(n=50)" in ok.reason
    assert "capability pass rate 0.750 → 0.750 on 80 tasks" in ok.reason
    untrusted = gate(_report(judge_trusted=False), GatePolicy())
    assert "no win rate: judge AUROC" in untrusted.reason
    assert gate(_report(thumbs=None), GatePolicy()).checks["preference"] is False
    wide = gate(_report(thumbs=([0.6, 0.4] * 6, [0.5] * 12)), GatePolicy())
    assert "not shown better here, lower bound -0.2" in wide.reason
    assert "but consistent with the win rate: upper bound +0.2" in wide.reason
    pleased = gate(
        _report(thumbs=([0.6, 0.4] * 6, [0.5] * 12), judge_was_reward=True), GatePolicy()
    )
    assert "the one the candidate was trained to please" in pleased.reason
    backwards = gate(_report(thumbs=([0.1] * 12, [0.9] * 12)), GatePolicy())
    assert "contradicts the win rate" in backwards.reason


def test_gate_policy_validation() -> None:
    with pytest.raises(InvalidSpec):
        GatePolicy(min_win_rate=1.5)
    with pytest.raises(InvalidSpec):
        GatePolicy(max_regression_kl=-1)
    with pytest.raises(InvalidSpec):
        GatePolicy(max_capability_drop=-0.1)
    with pytest.raises(InvalidSpec):
        GatePolicy(min_pref_improvement=2)
