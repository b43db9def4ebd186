"""The promotion gate: promote only what the held-out evidence shows better for the tenant and
no worse at answering. "Better" is read on the conservative side of a 95 % interval: the win
rate's lower bound, by a judge that earned the right to decide on thumbs it never saw, or the
tenant metric's lower bound when no win rate is asked for; so a lift the data do not support (a
coin-flip tenant, a handful of held-out thumbs) never passes. The held-out thumbs must then not
contradict it, or, for a candidate trained against the judge itself (GRPO), show the lift.
The damage checks (capability, drift) bound their measured value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.errors import InvalidSpec
from trainer.evaluation import EvalReport

__all__ = ["GateDecision", "GatePolicy", "gate"]


@dataclass(frozen=True)
class GatePolicy:
    """Promotion thresholds; a threshold set to ``None`` is not checked.

    Field names are the tenant policy's (``core.policy.TrainingPolicy``), which fills them by name.
    """

    min_pref_improvement: float | None = 0.0
    """Tenant metric on held-out feedback (pair accuracy, or the implicit-reward AUROC on unpaired
    thumbs): the candidate's lower 95 % bound minus the current version's value must reach this;
    or, when the trusted judge's win rate showed the candidate better, its upper bound must (the
    held-out thumbs do not contradict the win rate: a few dozen of them cannot show a lift on
    their own). The second way is closed to a candidate trained to please that judge (GRPO):
    its win rate is not independent evidence."""
    min_win_rate: float | None = 0.5
    """The lower 95 % bound of the win rate against the current version, judged by the tenant's
    thumbs judge on held-out questions, must reach this (0.5: better than a tie, with
    confidence). Fails when the judge did not earn the right to decide, and for a candidate
    trained to please that judge (GRPO) when the tenant metric is turned off."""
    max_capability_drop: float | None = 0.05
    """The capability suite's pass-rate drop (base minus candidate, same tasks, same decoding)
    must stay at or under this (0.05 = five points). Read at its point value: on ~80 tasks the
    paired interval is about as wide as the bound itself as soon as a few answers change in
    either direction, so its upper end would refuse nearly every adapter that changed anything;
    the interval is reported beside it."""
    max_regression_kl: float | None = 0.5
    """Mean per-token KL from the base model on the shared set must stay at or under this."""
    max_ppl_increase: float | None = 0.25
    """Relative perplexity increase on the shared set must stay at or under this."""

    def __post_init__(self) -> None:
        if self.min_win_rate is not None and not 0.0 <= self.min_win_rate <= 1.0:
            raise InvalidSpec(f"min_win_rate must be in [0, 1], got {self.min_win_rate}")
        if self.min_pref_improvement is not None and not -1.0 <= self.min_pref_improvement <= 1.0:
            raise InvalidSpec(
                f"min_pref_improvement must be in [-1, 1], got {self.min_pref_improvement}"
            )
        for name in ("max_regression_kl", "max_ppl_increase", "max_capability_drop"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidSpec(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    checks: dict[str, bool] = field(default_factory=dict)


def _cmp(ok: bool, good: str, bad: str) -> str:
    return good if ok else bad


def gate(report: EvalReport, policy: GatePolicy) -> GateDecision:
    """Promote only if every configured check passes; the reason lists each check's numbers."""
    checks: dict[str, bool] = {}
    notes: list[str] = []

    if policy.min_win_rate is not None:
        win = report.interval("win_rate")
        judge_reason = (report.judge or {}).get("reason") or "no thumbs judge"
        if not report.judge_trusted:
            checks["win_rate"] = False
            notes.append(f"no win rate: {judge_reason}")
        elif win is None:
            checks["win_rate"] = False
            notes.append(
                f"no win rate: too few held-out questions ({report.n_win_prompts}) to judge"
            )
        else:
            ok = win.low >= policy.min_win_rate
            checks["win_rate"] = ok
            notes.append(
                f"win rate {win} vs current ({report.wins} won, {report.ties} tied, "
                f"{report.losses} lost; lower bound {_cmp(ok, '≥', '<')} "
                f"{policy.min_win_rate:.3f})"
            )
            if ok and report.judge_was_reward and policy.min_pref_improvement is None:
                # Alone, the win rate of the judge the candidate was trained to please shows
                # only that it learned the judge.
                checks["win_rate"] = False
                notes.append(
                    "the candidate was trained to please this judge, and with the tenant metric "
                    "turned off nothing independent of it shows the candidate better"
                )
    if policy.min_pref_improvement is not None:
        if report.pref_improvement_low is None and report.pref_improvement is not None:
            # A report from before intervals (a run in flight across the upgrade): its point.
            ok = report.pref_improvement >= policy.min_pref_improvement
            checks["preference"] = ok
            notes.append(f"held-out preference accuracy change {report.pref_improvement:+.3f}")
        elif report.pref_improvement_low is None or report.tenant_metric is None:
            checks["preference"] = False
            notes.append(report.tenant_metric_note or "no held-out feedback to measure the tenant")
        else:
            key = "pref_accuracy" if report.tenant_metric == "pairs" else "thumbs_auroc"
            cand, cur = report.interval(f"{key}_candidate"), report.interval(f"{key}_current")
            low, need = report.pref_improvement_low, policy.min_pref_improvement
            current = cur.value if cur else float("nan")  # nan: no contradiction test passes
            high = cand.high - current if cand else float("nan")
            shown = low >= need
            # When the trusted judge's win rate showed the candidate better, the held-out thumbs
            # (a few dozen on sparse logs: an interval ±0.2-0.3 wide, whose lower bound a
            # clearly better adapter did not clear in the bench) must not contradict it: their
            # interval must still reach the bound.
            # Not when the candidate was trained to please that judge (GRPO): then the win rate
            # says how well it learned the judge: the bench's prose adapter won 0.67 of it while
            # its simulated users liked the answers no more (-7 points [-17, +4]).
            won = checks.get("win_rate", False)
            independent = not report.judge_was_reward
            consistent = won and independent and high >= need
            checks["preference"] = shown or consistent
            if shown:
                verdict = f"lower bound {low:+.3f} ≥ {need:+.3f} required"
            elif won and not independent:
                verdict = (
                    f"lower bound {low:+.3f} < {need:+.3f} required: the win rate's judge is "
                    "the one the candidate was trained to please, so the held-out thumbs must "
                    "show the lift on their own"
                )
            elif consistent:
                verdict = (
                    f"not shown better here, lower bound {low:+.3f}, but consistent with the "
                    f"win rate: upper bound {high:+.3f} ≥ {need:+.3f}"
                )
            elif won:
                verdict = (
                    f"lower bound {low:+.3f} < {need:+.3f} required, and upper bound "
                    f"{high:+.3f} < {need:+.3f} contradicts the win rate"
                )
            else:
                verdict = f"lower bound {low:+.3f} < {need:+.3f} required"
            notes.append(
                f"{report.tenant_metric_note}: candidate {cand} vs current {current:.3f} "
                f"({verdict})"
            )
    if policy.max_capability_drop is not None:
        drop = report.interval("capability_drop")
        if drop is None:
            checks["capability"] = False
            notes.append("the capability suite was not run")
        else:
            ok = drop.value <= policy.max_capability_drop
            checks["capability"] = ok
            notes.append(
                f"capability pass rate {report.capability_base:.3f} → "
                f"{report.capability_candidate:.3f} on {drop.n} tasks (drop {drop} "
                f"{_cmp(ok, '≤', '>')} {policy.max_capability_drop:.3f})"
            )
    drift = (
        ("regression_kl", "regression KL", report.regression_kl, policy.max_regression_kl, ".4f"),
        (
            "regression_ppl",
            "perplexity change",
            report.regression_ppl_increase,
            policy.max_ppl_increase,
            "+.3f",
        ),
    )
    for name, label, value, bound, fmt in drift:
        if bound is None:
            continue
        if value is None:
            checks[name] = False
            notes.append(f"{label} was not measured")
        else:
            checks[name] = value <= bound
            notes.append(f"{label} {value:{fmt}} {_cmp(checks[name], '≤', '>')} {bound:{fmt}}")
    promote = all(checks.values())
    failed = [name for name, ok in checks.items() if not ok]
    head = "promote" if promote else f"reject ({', '.join(failed)} failed)"
    return GateDecision(promote, f"{head}: " + ("; ".join(notes) or "no checks configured"), checks)
