"""The live canary's decision: do the tenant's users like the candidate's answers better than the
current version's?

Each arm's up-rate has a Beta(1 + up, 1 + down) posterior (a flat prior), and ``p_better`` is
P(candidate's rate > current's), computed exactly. Checking it after every thumb and promoting at
0.95 would promote a candidate that is merely equal far more often than one time in twenty: each
look is another chance for noise to cross the bar (simulated: 27 % of 400 equal canaries, 30
thumbs per arm before the first look). So the rule looks only when the smaller arm reaches
``min_thumbs`` x 2^k thumbs (k = 0, 1, 2, ...) and spends the error budget a = 1 - ``confidence``
over those looks: look k promotes when ``p_better`` ≥ 1 - a/2^(k+1) and rolls back when it is
≤ a/2^(k+1). The budgets sum to a, so by the union bound an equal candidate is promoted (or
rolled back) with probability at most about a however long the canary runs; "about", because the
posterior probability stands in for a one-sided p-value. ``tests/bench/canary.py`` measures it.

Answers that fail or slow down roll the candidate back without waiting for thumbs: its error rate
above the current version's by ``max_error_rate_increase``, or its p95 time per answer token
above ``max_p95_ratio`` times the current version's, each once the candidate has served
``min_requests`` requests. Rolling back is the safe direction, so these are checked at every look.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Arm", "CanaryRule", "Verdict", "decide", "design_effect", "in_canary", "p_better"]


MIN_CANARY_FRACTION, MAX_CANARY_FRACTION = 0.05, 0.5
"""The share of end users a canary may send to its candidate."""


@dataclass(frozen=True)
class Arm:
    """What one version did during the canary."""

    up: int = 0
    down: int = 0
    requests: int = 0
    """Answers served (rated or not)."""
    errors: int = 0
    """Requests that failed."""
    p95_ms: float | None = None
    """95th percentile of its answers' latency per answer token (so longer answers are not
    taken for slower serving)."""
    design_effect: float = 1.0
    """How much the thumbs' clustering by user inflates the variance of the up-rate
    (:func:`design_effect`); the posterior counts ``up`` and ``down`` divided by it."""

    @property
    def thumbs(self) -> int:
        return self.up + self.down

    def effective(self) -> tuple[int, int]:
        """Up and down thumbs worth of independent evidence (rounded, for the exact series)."""
        d = max(self.design_effect, 1.0)
        return round(self.up / d), round(self.down / d)


def design_effect(per_user: Sequence[tuple[int, int]]) -> float:
    """Variance inflation of an arm's up-rate when its thumbs come from a few users each: the
    cluster-robust (by user) variance of the ratio estimate over the binomial one, at least 1.

    Thumbs from one user are not independent (a lenient user likes most answers), and the split
    is by user, so an arm's up-rate also moves with which users it drew. Treating 500 thumbs
    from 40 users as 500 coin flips made an equal candidate look decided in one canary in five
    (``tests/bench/canary.py``). ``per_user``: (up, down) for each user with thumbs."""
    counts = [(u, d) for u, d in per_user if u + d]
    n = sum(u + d for u, d in counts)
    groups = len(counts)
    if groups < 2 or n == 0:
        return 1.0
    p = sum(u for u, _ in counts) / n
    if p in (0.0, 1.0):
        return 1.0
    robust = groups / (groups - 1) * sum((u - p * (u + d)) ** 2 for u, d in counts) / n**2
    return max(1.0, robust / (p * (1 - p) / n))


@dataclass(frozen=True)
class CanaryRule:
    min_thumbs: int = 30
    """Thumbs each arm needs before the first look; later looks at 2, 4, 8, ... times this."""
    confidence: float = 0.95
    """1 - the chance, over the whole canary, of promoting a candidate that is not better."""
    max_error_rate_increase: float = 0.02
    """Roll back when the candidate's share of failed requests exceeds the current's by this."""
    max_p95_ratio: float = 1.5
    """Roll back when the candidate's p95 time per answer token exceeds this multiple of the
    current's."""
    min_requests: int = 50
    """Requests the candidate serves before its errors and latency are judged."""

    def __post_init__(self) -> None:
        if self.min_thumbs < 1:
            raise ValueError(f"min_thumbs must be at least 1, got {self.min_thumbs}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}")
        if self.max_error_rate_increase < 0 or self.max_p95_ratio < 1 or self.min_requests < 1:
            raise ValueError(
                "max_error_rate_increase must be >= 0, max_p95_ratio >= 1, min_requests >= 1"
            )

    def bar(self, look: int) -> float:
        """The share of the error budget look ``look`` may spend (a/2^(look+1))."""
        return (1 - self.confidence) / 2 ** (look + 1)

    def looks_due(self, current: Arm, candidate: Arm) -> int:
        """How many looks the smaller arm's thumbs have reached (look k at min_thumbs x 2^k)."""
        smaller, looks = min(current.thumbs, candidate.thumbs), 0
        while smaller >= self.min_thumbs * 2**looks:
            looks += 1
        return looks


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "promote", "rollback", "expire"]
    reason: str
    p_better: float | None = None
    """P(candidate's up-rate > current's), computed at a look or at the end (``p_better()``
    gives it at any time)."""
    looks_done: int = 0
    """Looks spent so far, this one included: pass it to the next ``decide``."""


def in_canary(user: str, fraction: float, salt: str) -> bool:
    """Whether end user ``user`` is served the candidate: a stable share ``fraction`` of users,
    chosen by a hash salted with the canary (a new canary draws its users afresh), so a user
    stays on one arm across requests and sees one version's answers."""
    digest = hashlib.sha256(f"{salt}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def p_better(candidate: Arm, current: Arm) -> float:
    """P(p_candidate > p_current) for p ~ Beta(1 + up, 1 + down), each arm independent, with
    ``up`` and ``down`` the arm's effective thumbs (:meth:`Arm.effective`).

    The exact sum for integer parameters (a finite series over the candidate's ups; Cook, "Exact
    calculation of beta inequalities", 2005), in log space so thousands of thumbs do not
    overflow."""
    (up_c, down_c), (up_k, down_k) = candidate.effective(), current.effective()
    if up_c > up_k:  # the series runs over the first arm's ups: take the shorter one
        return 1.0 - p_better(current, candidate)
    a_c, b_c = up_c + 1, down_c + 1
    a_k, b_k = up_k + 1, down_k + 1
    norm = _log_beta(a_k, b_k)
    total = 0.0
    for i in range(a_c):
        total += math.exp(
            _log_beta(a_k + i, b_k + b_c) - math.log(b_c + i) - _log_beta(1 + i, b_c) - norm
        )
    return min(max(total, 0.0), 1.0)


def _health(current: Arm, candidate: Arm, rule: CanaryRule) -> str | None:
    """Why the candidate's answers are failing or slow, or None."""
    if candidate.requests < rule.min_requests:
        return None
    cand_errors = candidate.errors / candidate.requests
    cur_errors = current.errors / current.requests if current.requests else 0.0
    if cand_errors - cur_errors > rule.max_error_rate_increase:
        return (
            f"the candidate failed {cand_errors:.1%} of {candidate.requests} requests against "
            f"{cur_errors:.1%} for the current version (limit +{rule.max_error_rate_increase:.1%})"
        )
    if candidate.p95_ms is not None and current.p95_ms:
        ratio = candidate.p95_ms / current.p95_ms
        if ratio > rule.max_p95_ratio:
            return (
                f"the candidate's p95 time per answer token is {candidate.p95_ms:.1f} ms, "
                f"{ratio:.2f}x the current version's {current.p95_ms:.1f} ms "
                f"(limit {rule.max_p95_ratio:.2f}x)"
            )
    return None


def _arms(current: Arm, candidate: Arm) -> str:
    return f"candidate {candidate.up}/{candidate.thumbs} up, current {current.up}/{current.thumbs}"


def decide(
    current: Arm,
    candidate: Arm,
    rule: CanaryRule | None = None,
    *,
    looks_done: int = 0,
    expired: bool = False,
) -> Verdict:
    """What to do with the canary now. ``looks_done`` is the previous verdict's (0 at the start);
    ``expired``: the canary's time is up, so without a decision the current version stays."""
    rule = rule or CanaryRule()
    unhealthy = _health(current, candidate, rule)
    if unhealthy is not None:
        return Verdict("rollback", unhealthy, looks_done=looks_done)
    p: float | None = None
    due = rule.looks_due(current, candidate)
    if due > looks_done:
        # Several looks due at once (a late poll): only the last, whose bar is the strictest;
        # the skipped looks' budgets go unspent.
        bar = rule.bar(due - 1)
        looks_done = due
        p = p_better(candidate, current)
        if p >= 1 - bar:
            return Verdict(
                "promote",
                f"P(candidate better) = {p:.4f} >= {1 - bar:.4f} at look {looks_done} "
                f"({_arms(current, candidate)})",
                p,
                looks_done,
            )
        if p <= bar:
            return Verdict(
                "rollback",
                f"P(candidate better) = {p:.4f} <= {bar:.4f} at look {looks_done} "
                f"({_arms(current, candidate)})",
                p,
                looks_done,
            )
    if expired:
        if p is None and current.thumbs and candidate.thumbs:
            p = p_better(candidate, current)
        return Verdict(
            "expire",
            "the canary's time ran out before its users' thumbs decided "
            f"({_arms(current, candidate)}"
            + (f", P(candidate better) = {p:.3f}" if p is not None else "")
            + "); the current version stays",
            p,
            looks_done,
        )
    need = rule.min_thumbs * 2**looks_done
    return Verdict(
        "wait",
        f"next look when each arm has {need} thumbs ({_arms(current, candidate)})",
        p,
        looks_done,
    )
