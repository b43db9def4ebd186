"""Which version answers a tenant's ``default`` model: promotion, rollback and the live canary.

A deployment is a pointer (``deployments.version_id``), so promotion and rollback are flips and
names never change. A canary adds a second pointer: the candidate answers ``default`` for a
stable share of end users (:func:`core.canary.in_canary`), every answer records its arm, and the
thumbs on each arm's answers are what :func:`core.canary.decide` weighs. Registration and
resolving a request's ``model`` live with the serving tier (``serving/registry.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Integer, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.canary import MAX_CANARY_FRACTION, MIN_CANARY_FRACTION, Arm, design_effect, p_better
from core.errors import Conflict, InvalidInput, NotFound
from core.models import AdapterStatus, AdapterVersion, Deployment, Feedback, Interaction

CANDIDATE, CURRENT = "candidate", "current"
"""The arms of a canary, as ``interactions.canary_arm`` records them."""


async def get_version(session: AsyncSession, *, tenant_id: str, version_id: str) -> AdapterVersion:
    version = await session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.tenant_id == tenant_id, AdapterVersion.id == version_id
        )
    )
    if version is None:
        raise NotFound(f"no adapter version {version_id!r}")
    return version


async def list_versions(session: AsyncSession, *, tenant_id: str) -> list[AdapterVersion]:
    rows = await session.scalars(
        select(AdapterVersion)
        .where(AdapterVersion.tenant_id == tenant_id)
        .order_by(AdapterVersion.id.desc())
    )
    return list(rows)


async def live_version_id(session: AsyncSession, *, tenant_id: str) -> str | None:
    return await session.scalar(
        select(Deployment.version_id).where(Deployment.tenant_id == tenant_id)
    )


async def promote(session: AsyncSession, *, tenant_id: str, version_id: str) -> AdapterVersion:
    """Make ``version_id`` what ``default`` serves (committed). The old one is retired."""
    version, _ = await promote_replacing(session, tenant_id=tenant_id, version_id=version_id)
    return version


async def promote_replacing(
    session: AsyncSession, *, tenant_id: str, version_id: str
) -> tuple[AdapterVersion, AdapterVersion | None]:
    """``promote``, also returning the version it replaced (None: the base model, or nothing
    changed), read under the deployment's row lock: of two promotions at once, each gets the
    one it really replaced."""
    version = await get_version(session, tenant_id=tenant_id, version_id=version_id)
    deployment = await session.get(Deployment, tenant_id, with_for_update=True)
    if deployment is None:
        deployment = Deployment(tenant_id=tenant_id)
        session.add(deployment)
    if deployment.version_id == version.id:
        return version, None
    now = datetime.now(UTC)
    old = None
    _end_canary(deployment)  # promoting by hand settles a running canary too
    if deployment.version_id is not None:
        old = await get_version(session, tenant_id=tenant_id, version_id=deployment.version_id)
        old.status = AdapterStatus.retired
    deployment.previous_version_id = deployment.version_id
    deployment.version_id = version.id
    version.status = AdapterStatus.promoted
    version.promoted_at = now
    await session.commit()
    return version, old


async def rollback(session: AsyncSession, *, tenant_id: str) -> AdapterVersion | None:
    """Serve the version promoted before the live one (or the base model if there was none).

    Returns the version now live (None: base). The rolled-back version is retired with a reason.
    """
    live, _ = await rollback_replacing(session, tenant_id=tenant_id)
    return live


async def rollback_replacing(
    session: AsyncSession, *, tenant_id: str
) -> tuple[AdapterVersion | None, AdapterVersion]:
    """``rollback``, also returning the version rolled back (read under the row lock)."""
    deployment = await session.get(Deployment, tenant_id, with_for_update=True)
    if deployment is None or deployment.version_id is None:
        raise Conflict("nothing to roll back: the base model is being served", code="no_rollback")
    current = await get_version(session, tenant_id=tenant_id, version_id=deployment.version_id)
    earlier = await session.scalar(
        select(AdapterVersion)
        .where(
            AdapterVersion.tenant_id == tenant_id,
            AdapterVersion.id != current.id,
            AdapterVersion.promoted_at.is_not(None),
            AdapterVersion.promoted_at <= current.promoted_at,
            AdapterVersion.status == AdapterStatus.retired,
        )
        .order_by(AdapterVersion.promoted_at.desc())
        .limit(1)
    )
    _end_canary(deployment)
    current.status = AdapterStatus.retired
    current.reason = "rolled back"
    deployment.previous_version_id = current.id
    deployment.version_id = earlier.id if earlier is not None else None
    if earlier is not None:
        earlier.status = AdapterStatus.promoted
    await session.commit()
    return earlier, current


# --- the live canary ------------------------------------------------------------------------


def _end_canary(deployment: Deployment) -> None:
    deployment.canary_version_id = None
    deployment.canary_fraction = 0.0
    deployment.canary_started_at = None
    deployment.canary_current_errors = deployment.canary_candidate_errors = 0


@dataclass(frozen=True)
class Canary:
    """A running canary and its arms' thumbs so far."""

    version_id: str
    """The candidate."""
    current_version_id: str | None
    """What the other users get (None: the base model)."""
    fraction: float
    started_at: datetime
    current: Arm
    candidate: Arm

    @property
    def p_better(self) -> float | None:
        """P(candidate's up-rate > current's) with each arm's users' clustering accounted for."""
        if not (self.current.thumbs and self.candidate.thumbs):
            return None
        return p_better(self.candidate, self.current)


async def start_canary(
    session: AsyncSession, *, tenant_id: str, version_id: str, fraction: float
) -> Deployment:
    """Let ``version_id`` answer ``default`` for ``fraction`` of the tenant's end users
    (committed). One canary at a time; the live version cannot be its own canary."""
    if not MIN_CANARY_FRACTION <= fraction <= MAX_CANARY_FRACTION:
        raise InvalidInput(
            f"fraction must be between {MIN_CANARY_FRACTION} and {MAX_CANARY_FRACTION}, "
            f"got {fraction}"
        )
    version = await get_version(session, tenant_id=tenant_id, version_id=version_id)
    deployment = await session.get(Deployment, tenant_id, with_for_update=True)
    if deployment is None:
        deployment = Deployment(tenant_id=tenant_id)
        session.add(deployment)
    if deployment.canary_version_id is not None:
        raise Conflict(
            f"a canary of {deployment.canary_version_id} is already running: promote or abort "
            "it first",
            code="canary_running",
        )
    if deployment.version_id == version.id:
        raise Conflict(f"{version.id} is already live", code="already_live")
    deployment.canary_version_id = version.id
    deployment.canary_fraction = fraction
    deployment.canary_started_at = datetime.now(UTC)
    deployment.canary_current_errors = deployment.canary_candidate_errors = 0
    await session.commit()
    return deployment


async def record_canary_failure(
    session: AsyncSession, *, tenant_id: str, canary_version_id: str, arm: str
) -> None:
    """A request the canary of ``canary_version_id`` sent to ``arm`` failed without an answer
    (committed). One atomic increment, so concurrent failures all count; a canary that ended,
    or was replaced, since the request was routed is not charged."""
    errors = (
        Deployment.canary_candidate_errors if arm == CANDIDATE else Deployment.canary_current_errors
    )
    await session.execute(
        update(Deployment)
        .where(Deployment.tenant_id == tenant_id, Deployment.canary_version_id == canary_version_id)
        .values({errors: errors + 1})
    )
    await session.commit()


LATENCY_SAMPLE = 2000
"""An arm's p95 time per answer token is read from its latest answers, this many at most."""


def _arm_of(counts: Sequence[tuple[int, int]]) -> Arm:
    """An arm's thumbs from (up, down) per end user, their clustering included."""
    return Arm(
        up=sum(u for u, _ in counts),
        down=sum(d for _, d in counts),
        design_effect=design_effect(counts),
    )


def _own_answers(deployment: Deployment) -> ColumnElement[bool]:
    """Answers their arm's version gave. A fallback's answer (the base model standing in for a
    version that failed; it has no version) is not one: its thumbs judge base, not the arm, whose
    failure counts as an error instead. When base is live, the current arm's answers have no
    version either, and are its own."""
    by_a_version = Interaction.adapter_version_id.is_not(None)
    if deployment.version_id is None:
        return by_a_version | (Interaction.canary_arm == CURRENT)
    return by_a_version


async def _arm(
    session: AsyncSession, deployment: Deployment, arm: str, *, latency: bool = False
) -> Arm:
    since = deployment.canary_started_at
    answers = (Interaction.tenant_id == deployment.tenant_id) & (Interaction.canary_arm == arm)
    if since is not None:
        answers &= Interaction.created_at >= since
    # Thumbs per end user (a thumb without one is its own user): an arm's users, not its
    # thumbs, are the independent draws (core.canary.design_effect).
    user = func.coalesce(Feedback.user_id, Feedback.id)
    own = _own_answers(deployment)
    per_user = (
        await session.execute(
            select(
                func.sum((Feedback.rating > 0).cast(Integer)),
                func.sum((Feedback.rating < 0).cast(Integer)),
            )
            .select_from(Feedback)
            .join(Interaction, Interaction.id == Feedback.interaction_id)
            .where(answers, own, Feedback.tenant_id == deployment.tenant_id)
            .group_by(user)
        )
    ).all()
    counts = [(int(u or 0), int(d or 0)) for u, d in per_user]
    # An arm fails a request when no answer came (counted on the deployment row) or when the
    # base model answered in its version's place (a fallback: an answer not its own).
    answered, fallbacks = (
        await session.execute(
            select(func.count(), func.sum(case((own, 0), else_=1))).where(answers)
        )
    ).one()
    failed = (
        deployment.canary_candidate_errors if arm == CANDIDATE else deployment.canary_current_errors
    )
    requests = int(answered or 0) + failed
    p95: float | None = None
    if latency and answered:
        recent = (
            await session.execute(
                select(Interaction.latency_ms, Interaction.completion_tokens)
                .where(answers)
                .order_by(Interaction.created_at.desc())
                .limit(LATENCY_SAMPLE)
            )
        ).all()
        # Per answer token: a candidate whose users like longer answers is not a slow one.
        ordered = sorted(ms / max(tokens, 1) for ms, tokens in recent)
        p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]  # nearest rank
    return replace(
        _arm_of(counts),
        requests=requests,
        errors=failed + int(fallbacks or 0),
        p95_ms=p95,
    )


async def current_canary(
    session: AsyncSession, *, tenant_id: str, latency: bool = False
) -> Canary | None:
    """The running canary with its arms' thumbs and requests, or None. ``latency`` adds each
    arm's p95 time per answer token, which the rule's health check reads (the workflow running
    the rule asks for it; a status page need not sort thousands of latencies)."""
    deployment = await session.get(Deployment, tenant_id)
    if deployment is None or deployment.canary_version_id is None:
        return None
    assert deployment.canary_started_at is not None  # set with the version
    return Canary(
        version_id=deployment.canary_version_id,
        current_version_id=deployment.version_id,
        fraction=deployment.canary_fraction,
        started_at=deployment.canary_started_at,
        current=await _arm(session, deployment, CURRENT, latency=latency),
        candidate=await _arm(session, deployment, CANDIDATE, latency=latency),
    )


async def p_better_over_time(
    session: AsyncSession, *, tenant_id: str, points: int = 40
) -> list[tuple[float, float]]:
    """How P(candidate better) moved as the running canary's thumbs came in: (hours since it
    began, P) after every thumb, thinned to about ``points`` evenly spaced ones (the last one
    always kept). Each point is what ``Canary.p_better`` said then, users' clustering included.
    Empty without a canary, or until both arms have thumbs."""
    deployment = await session.get(Deployment, tenant_id)
    if deployment is None or deployment.canary_started_at is None:
        return []
    started = deployment.canary_started_at
    rows = (
        await session.execute(
            select(
                Feedback.created_at,
                Interaction.canary_arm,
                func.coalesce(Feedback.user_id, Feedback.id),
                Feedback.rating,
            )
            .join(Interaction, Interaction.id == Feedback.interaction_id)
            .where(
                Feedback.tenant_id == tenant_id,
                Interaction.tenant_id == tenant_id,
                Interaction.canary_arm.is_not(None),
                Interaction.created_at >= started,
                _own_answers(deployment),
            )
            .order_by(Feedback.created_at, Feedback.id)
        )
    ).all()
    last = len(rows) - 1
    keep = {last} | {round(i * last / max(points - 1, 1)) for i in range(points)}
    per_user: dict[str, dict[str, list[int]]] = {CURRENT: {}, CANDIDATE: {}}
    series: list[tuple[float, float]] = []
    for i, (at, arm, user, rating) in enumerate(rows):
        arm_users = per_user[CANDIDATE if arm == CANDIDATE else CURRENT]
        arm_users.setdefault(user, [0, 0])[0 if rating > 0 else 1] += 1
        if i not in keep:
            continue
        cur, cand = (
            _arm_of([(u, d) for u, d in per_user[a].values()]) for a in (CURRENT, CANDIDATE)
        )
        if cur.thumbs and cand.thumbs:
            hours = (at - started).total_seconds() / 3600
            series.append((max(hours, 0.0), p_better(cand, cur)))
    return series


BY_ADMIN = {True: "canary promoted by an admin", False: "canary aborted by an admin"}
"""The reason a canary ended by hand (API or dashboard) records, by whether it promoted."""


async def conclude_canary(
    session: AsyncSession,
    *,
    tenant_id: str,
    promote: bool,
    reason: str,
    version_id: str | None = None,
) -> tuple[AdapterVersion, AdapterVersion | None]:
    """End the running canary (committed): promote its candidate, or reject it with ``reason``.
    ``version_id``: only if the canary is that version's (what its caller looked at; an admin
    may have ended it and started another since).

    Returns the candidate and, when it was promoted, the version it replaced (None: base)."""
    deployment = await session.get(Deployment, tenant_id, with_for_update=True)
    if deployment is None or deployment.canary_version_id is None:
        raise Conflict("no canary is running", code="no_canary")
    if version_id is not None and deployment.canary_version_id != version_id:
        raise Conflict(
            f"the running canary is {deployment.canary_version_id}'s, not {version_id}'s",
            code="no_canary",
        )
    candidate_id = deployment.canary_version_id
    if promote:
        version, replaced = await promote_replacing(
            session, tenant_id=tenant_id, version_id=candidate_id
        )
        version.reason = reason
        await session.commit()
        return version, replaced
    version = await get_version(session, tenant_id=tenant_id, version_id=candidate_id)
    _end_canary(deployment)
    version.status = AdapterStatus.rejected
    version.reason = reason
    await session.commit()
    return version, None
