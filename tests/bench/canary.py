"""Canary decision benchmark: does the live canary's rule (``core/canary.py``) promote a candidate
its users like clearly more, keep one they like the same, and roll back one they like less, and
after how many thumbs?

This measures the rule on simulated live traffic, not the serving path. The split itself (a
stable arm per end user, each answer recorded with its arm, thumbs counted per arm) is tested
through HTTP in ``tests/serving/test_canary.py`` and by the workflow in
``tests/workflows/test_canary_rollout.py``; its cost per request is ``canary_resolve.py``;
``canary_live.py`` has the persona's users rate real answers of real versions, through this
loop. The simulated traffic:

- a tenant's end users (``--users``, 200) each have a leniency of their own (a logit offset,
  normal with sd ``--user-sd``, 1.0) and an activity of their own (log-normal): real thumbs come
  in clusters, from the same users again and again;
- each user is on one arm for the whole canary (``core.canary.in_canary``, ``--fraction`` 0.2 on
  the candidate), as the product splits traffic;
- a request's answer is liked with the arm's up-rate shifted by its user's leniency; half the
  answers are rated and one rating in ten is flipped (the realistic traffic's defaults);
- the rule is asked after every thumb until it decides, or until ``--max-requests`` requests (the
  canary's time runs out: the current version stays). At each look, each arm's thumbs are
  discounted by their clustering by user (``core.canary.design_effect``); ``--independent``
  counts every thumb as independent, to compare.

Up-rates come from the personalization bench's held-out liked shares (base vs adapter): plain
60 % → 77 %, bullets 22 % → 67 %; "+15" is 60 % → 75 %, "equal" 60 % both, "worse" 60 % → 45 %.
Prints a table and writes JSON to ``tests/bench/results/``::

    .venv/bin/python -m tests.bench.canary              # 200 seeds per scenario, ~1 minute
    .venv/bin/python -m tests.bench.canary --seeds 20 --user-sd 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from core.canary import Arm, CanaryRule, decide, design_effect, in_canary
from trainer.stats import proportion

RESULTS = Path(__file__).parent / "results"

SCENARIOS: dict[str, tuple[float, float]] = {
    "better +15": (0.60, 0.75),
    "plain (60 → 77 %)": (0.60, 0.77),
    "bullets (22 → 67 %)": (0.22, 0.67),
    "equal": (0.60, 0.60),
    "equal, rare ups (22 %)": (0.22, 0.22),
    "worse -15": (0.60, 0.45),
}
"""Scenario: (current's up-rate, candidate's up-rate) for a user of average leniency."""


@dataclass
class Outcome:
    action: str
    thumbs: int
    """Thumbs on both arms when the rule decided (or when time ran out)."""
    candidate_thumbs: int
    requests: int


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


Liked = Callable[[int, bool, random.Random], bool]
"""Whether user ``i`` likes the answer their arm (True: the candidate) gave this request."""


def run_canary(
    liked: Liked,
    activity: Sequence[float],
    on_candidate: Sequence[bool],
    args: argparse.Namespace,
    rule: CanaryRule,
    rng: random.Random,
) -> Outcome:
    """One canary: requests from users picked by ``activity`` (cumulative weights), each answered
    on the user's arm and rated with probability ``args.rate_share`` (one rating in
    ``1 / args.flip_share`` flipped), the rule asked after every thumb (as the product's run
    does at each look), until it decides or ``args.max_requests`` requests have come in."""
    users = range(len(on_candidate))
    up_down = {False: [0, 0], True: [0, 0]}
    per_user: dict[bool, dict[int, list[int]]] = {False: {}, True: {}}
    looks, requests = 0, 0

    def arms(expired: bool = False) -> tuple[Arm, Arm]:
        current, candidate = Arm(*up_down[False]), Arm(*up_down[True])
        if args.cluster_robust and (expired or rule.looks_due(current, candidate) > looks):
            # As the product does: the users' clustering is measured when the rule looks.
            current, candidate = (
                replace(a, design_effect=design_effect([(u, d) for u, d in per_user[k].values()]))
                for a, k in ((current, False), (candidate, True))
            )
        return current, candidate

    while requests < args.max_requests:
        requests += 1
        i = rng.choices(users, cum_weights=activity)[0]
        arm = on_candidate[i]
        up = liked(i, arm, rng)
        if rng.random() >= args.rate_share:
            continue
        if rng.random() < args.flip_share:
            up = not up
        up_down[arm][0 if up else 1] += 1
        per_user[arm].setdefault(i, [0, 0])[0 if up else 1] += 1
        verdict = decide(*arms(), rule, looks_done=looks)
        looks = verdict.looks_done
        if verdict.action != "wait":
            break
    else:
        verdict = decide(*arms(expired=True), rule, looks_done=looks, expired=True)
    return Outcome(
        action=verdict.action,
        thumbs=sum(up_down[False]) + sum(up_down[True]),
        candidate_thumbs=sum(up_down[True]),
        requests=requests,
    )


def canary(
    rates: tuple[float, float], args: argparse.Namespace, rule: CanaryRule, seed: int
) -> Outcome:
    rng = random.Random(seed)
    salt = f"canary-{seed}"
    users = [f"u{i}" for i in range(args.users)]
    leniency = [rng.gauss(0.0, args.user_sd) for _ in users]
    activity = list(itertools.accumulate(rng.lognormvariate(0.0, 1.0) for _ in users))
    on_candidate = [in_canary(u, args.fraction, salt) for u in users]
    base = [_logit(r) for r in rates]

    def liked(i: int, arm: bool, rng: random.Random) -> bool:
        return rng.random() < 1 / (1 + math.exp(-(base[arm] + leniency[i])))

    return run_canary(liked, activity, on_candidate, args, rule, rng)


def add_traffic_arguments(parser: argparse.ArgumentParser) -> None:
    """The canary's traffic, as :func:`run_canary` reads it."""
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.2, help="users on the candidate")
    parser.add_argument("--rate-share", type=float, default=0.5)
    parser.add_argument("--flip-share", type=float, default=0.1)
    parser.add_argument("--max-requests", type=int, default=8000)


def share(outcomes: list[Outcome], action: str) -> str:
    est = proportion(sum(o.action == action for o in outcomes), len(outcomes))
    return f"{est.value:.0%} [{est.low:.0%}, {est.high:.0%}]"


def thumbs_to(outcomes: list[Outcome], action: str) -> str:
    decided = sorted(o.thumbs for o in outcomes if o.action == action)
    if not decided:
        return "-"
    q = statistics.quantiles(decided, n=10) if len(decided) > 1 else [decided[0]] * 9
    return f"{statistics.median(decided):.0f} [{q[0]:.0f}, {q[-1]:.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="canaries per scenario (>= 20)")
    add_traffic_arguments(parser)
    parser.add_argument("--user-sd", type=float, default=1.0, help="users' leniency, in logits")
    parser.add_argument(
        "--independent",
        dest="cluster_robust",
        action="store_false",
        help="treat every thumb as independent (no design effect): the rule without its "
        "correction for users' clustering, to compare",
    )
    parser.add_argument("--min-thumbs", type=int, default=CanaryRule.min_thumbs)
    parser.add_argument("--confidence", type=float, default=CanaryRule.confidence)
    args = parser.parse_args()
    if args.seeds < 20:
        sys.exit("--seeds must be at least 20")
    rule = CanaryRule(min_thumbs=args.min_thumbs, confidence=args.confidence)
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    started = time.monotonic()
    results: dict[str, list[Outcome]] = {
        name: [canary(rates, args, rule, seed) for seed in range(args.seeds)]
        for name, rates in SCENARIOS.items()
    }
    table = Table(
        title=f"canary rule, {args.seeds} seeds each: share of canaries [95 % CI]; "
        "thumbs (both arms) to decision, median [p10, p90]"
    )
    for col in ("scenario", "up-rate current → cand.", "promoted", "rolled back", "time ran out"):
        table.add_column(col)
    table.add_column("thumbs to promote")
    table.add_column("thumbs to roll back")
    for name, outcomes in results.items():
        cur, cand = SCENARIOS[name]
        table.add_row(
            name,
            f"{cur:.0%} → {cand:.0%}",
            share(outcomes, "promote"),
            share(outcomes, "rollback"),
            share(outcomes, "expire"),
            thumbs_to(outcomes, "promote"),
            thumbs_to(outcomes, "rollback"),
        )
    console.print(table)
    out: dict[str, Any] = {
        "benchmark": "canary",
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args),
        "rule": asdict(rule),
        "wall_s": round(time.monotonic() - started, 1),
        "scenarios": {
            name: {
                "rates": SCENARIOS[name],
                "outcomes": [asdict(o) for o in outcomes],
                **{
                    a: proportion(sum(o.action == a for o in outcomes), len(outcomes)).to_dict()
                    for a in ("promote", "rollback", "expire")
                },
            }
            for name, outcomes in results.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"canary-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
