"""The tenant dashboard: server-rendered pages under ``/dashboard``.

Scoping works exactly like the JSON API: the tenant comes from the session (the key that logged
in, or the tenant a platform key switched to), never from the URL, and every query filters by it,
so another tenant's run or version id is simply "not found". State changes are POST forms carrying
the session's CSRF token; reading works without JavaScript (one small script refreshes a training
run's live section in place).
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession

from api.dashboard import charts
from api.dashboard.session import (
    CSRF_FIELD,
    DashboardSession,
    SessionCodec,
    csrf_ok,
    new_session,
    still_valid,
    switch_tenant,
)
from api.deps import SessionDep, billing_config, orchestrator
from api.orchestration import MAX_DECISION_REASON, awaiting_approval, save_policy
from core import billing, deployments, keys, tenants
from core.canary import MAX_CANARY_FRACTION, MIN_CANARY_FRACTION
from core.errors import DomainError, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from core.feedback import feedback_stats, list_feedback
from core.models import (
    AdapterVersion,
    ApiKey,
    Dataset,
    KeyRole,
    RunEvent,
    Tenant,
    TrainingRun,
)
from core.policy import TrainingPolicy, policy_of
from core.runs import ACTIVE, find_run
from serving.gateway import AdapterPlacement
from trainer.stats import proportion

log = logging.getLogger(__name__)

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATIC_DIR = Path(__file__).parent / "static"

# Messages shown after a redirect: a fixed set, so nothing user-supplied is echoed back.
NOTICES = {
    "run_started": "Run started.",
    "run_running": "A run is already in flight for this tenant; here it is.",
    "cancel_requested": "Cancellation requested; training stops at the next step.",
    "approved": "Approved: the run promotes its candidate now.",
    "rejected": "Rejected: the candidate is kept as a rejected version with your reason.",
    "promoted": "Promoted: this version now answers the tenant's `default` model.",
    "rolled_back": "Rolled back to the previous version.",
    "canary_started": "Canary started: the candidate answers its share of end users.",
    "canary_promoted": "Canary promoted: the candidate now answers everyone.",
    "canary_aborted": "Canary aborted: the live version answers everyone again.",
    "policy_saved": "Training policy saved.",
    "key_revoked": "Key revoked; it stops working at once.",
    "switched": "Switched tenant.",
}


class _LoginRequired(Exception):
    """Not logged in (or the session ended): go to the login page."""


class _PickTenant(Exception):
    """A platform key has not chosen a tenant yet."""


class DashboardRoute(APIRoute):
    """Errors on dashboard routes become pages a person can read, not JSON envelopes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except _LoginRequired:
                target = request.url.path
                response = RedirectResponse(
                    f"/dashboard/login?next={quote(target)}", status_code=303
                )
                codec(request).clear(response)
                return response
            except _PickTenant:
                return RedirectResponse("/dashboard/tenants", status_code=303)
            except DomainError as exc:
                session = getattr(request.state, "dashboard_session", None)
                if isinstance(exc, NotFound) and session is not None:
                    # As in the API: the caller sees a plain miss, the operator sees the probe.
                    log.warning(
                        "dashboard not found for tenant %s (%s key %s): %s %s",
                        session.tenant_id or "-",
                        session.role.value,
                        session.key_id,
                        request.method,
                        request.url.path,
                    )
                return error_page(request, exc.status, exc.message)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
                )
                return error_page(request, 422, f"this page cannot take that input ({problems})")
            except (OperationalError, InterfaceError, PoolTimeout, ConnectionError) as exc:
                log.warning("dashboard: database unavailable: %s", exc)
                page = error_page(
                    request, 503, "the database is not answering; try again in a moment"
                )
                page.headers["Retry-After"] = "1"
                return page

        return route


router = APIRouter(prefix="/dashboard", route_class=DashboardRoute, include_in_schema=False)


def codec(request: Request) -> SessionCodec:
    found: SessionCodec | None = getattr(request.app.state, "session_codec", None)
    if found is None:
        found = request.app.state.session_codec = SessionCodec(request.app.state.settings)
    return found


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    titles = {
        402: "Payment required",
        403: "Not allowed",
        404: "Not found",
        409: "Conflict",
        422: "Can't use that",
        503: "Try again shortly",
    }
    return TEMPLATES.TemplateResponse(
        request,
        "error.html",
        {
            "title": titles.get(
                status, "Something went wrong" if status >= 500 else "Can't do that"
            ),
            "message": message,
            "status": status,
            "s": None,
        },
        status_code=status,
    )


async def current(request: Request, db: SessionDep) -> DashboardSession:
    s = codec(request).read(request)
    if s is None or not await still_valid(db, s):
        raise _LoginRequired
    request.state.dashboard_session = s
    return s


SessionUser = Annotated[DashboardSession, Depends(current)]


async def tenant_of(s: SessionUser) -> str:
    if s.tenant_id is None:
        raise _PickTenant
    return s.tenant_id


TenantId = Annotated[str, Depends(tenant_of)]


async def checked(request: Request, s: SessionUser) -> DashboardSession:
    """A state-changing form: the session's CSRF token must come with it."""
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not csrf_ok(s, token if isinstance(token, str) else None):
        raise PermissionDenied(
            "this form is out of date or did not come from the dashboard; reload the page and "
            "try again"
        )
    return s


CheckedUser = Annotated[DashboardSession, Depends(checked)]


def placement(request: Request) -> AdapterPlacement:
    found: AdapterPlacement = request.app.state.placement
    return found


async def render(
    request: Request,
    db: AsyncSession,
    s: DashboardSession,
    template: str,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    tenant = await db.get(Tenant, s.tenant_id) if s.tenant_id else None
    notice = NOTICES.get(request.query_params.get("notice", ""))
    return TEMPLATES.TemplateResponse(
        request,
        template,
        {"s": s, "tenant": tenant, "notice": notice, "csrf_field": CSRF_FIELD, **context},
        status_code=status_code,
    )


def back_to(path: str, notice: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?notice={notice}", status_code=303)


# --- login -------------------------------------------------------------------------------------


@router.get("/login")
async def login_page(request: Request, next: str = "/dashboard") -> HTMLResponse:
    return _login_form(request, next=next, error=None, status=200)


def _login_form(request: Request, *, next: str, error: str | None, status: int) -> HTMLResponse:
    token = codec(request).login_form_token(request)
    page = TEMPLATES.TemplateResponse(
        request,
        "login.html",
        {"s": None, "next": _safe_next(next), "error": error, "login_token": token},
        status_code=status,
    )
    codec(request).remember_login_form(page, token)
    return page


def _safe_next(target: str) -> str:
    """Where to go after logging in: a plain path inside the dashboard, else the overview —
    never another site (``//host``, a scheme) nor a path that leaves ``/dashboard`` by ``..``."""
    parts = urlsplit(target)
    inside = parts.path == "/dashboard" or parts.path.startswith("/dashboard/")
    plain = posixpath.normpath(parts.path) == parts.path and "\\" not in target
    if parts.scheme or parts.netloc or not inside or not plain:
        return "/dashboard"
    return target


@router.post("/login")
async def login(
    request: Request,
    db: SessionDep,
    key: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=500)] = "/dashboard",
    login_token: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    if not codec(request).login_form_ok(request, login_token):
        # Another site's form (or one older than an hour): never log a browser in from it.
        return _login_form(
            request,
            next=next,
            error="this login form is out of date or did not come from the dashboard; log in again",
            status=403,
        )
    try:
        principal = await keys.authenticate(db, key.strip())
        if principal.role is KeyRole.product:
            raise PermissionDenied("product keys call the API only; log in with a tenant admin key")
    except (Unauthenticated, PermissionDenied) as exc:
        return _login_form(request, next=next, error=exc.message, status=exc.status)
    session = new_session(
        key_id=principal.key_id, role=principal.role, tenant_id=principal.tenant_id
    )
    response = RedirectResponse(
        _safe_next(next) if principal.tenant_id else "/dashboard/tenants", status_code=303
    )
    codec(request).write(response, session)
    return response


@router.post("/logout")
async def logout(request: Request, db: SessionDep, s: CheckedUser) -> Response:
    # On the server: a copy of this cookie (or any other session this key opened) is over too.
    key = await db.get(ApiKey, s.key_id)
    if key is not None:
        key.sessions_valid_after = datetime.now(UTC)
        await db.commit()
    response = RedirectResponse("/dashboard/login", status_code=303)
    codec(request).clear(response)
    return response


# --- platform: tenants -------------------------------------------------------------------------


@router.get("/tenants")
async def tenant_list(request: Request, db: SessionDep, s: SessionUser) -> HTMLResponse:
    if not s.is_platform:
        raise NotFound("no such page")
    rows = await tenants.list_tenants(db, limit=500)
    return await render(request, db, s, "tenants.html", rows=rows)


@router.post("/tenants/switch")
async def tenant_switch(
    request: Request,
    db: SessionDep,
    s: CheckedUser,
    tenant_id: Annotated[str, Form(max_length=40)],
) -> Response:
    if not s.is_platform:
        raise NotFound("no such page")
    tenant = await tenants.get_tenant(db, tenant_id=tenant_id)
    response = back_to("/dashboard", "switched")
    codec(request).write(response, switch_tenant(s, tenant.id))
    return response


# --- overview ----------------------------------------------------------------------------------


@router.get("")
async def overview(
    request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    totals, days = await feedback_stats(db, tenant_id=tenant_id, days=30)
    labels = [d.day.strftime("%m-%d") for d in days]
    volume = charts.bar_chart(
        "Feedback per day (last 30 days)",
        labels,
        [
            charts.Series("up", [(i, d.up) for i, d in enumerate(days)]),
            charts.Series("down", [(i, d.down) for i, d in enumerate(days)]),
        ],
    )
    up_rate = charts.line_chart(
        "Up-rate per day",
        [
            charts.Series(
                "up-rate",
                [(i, d.up_rate * 100) for i, d in enumerate(days) if d.up_rate is not None],
            )
        ],
        y_format=lambda v: f"{v:.0f}%",
        y_range=(0, 100),
        x_range=(0, len(days) - 1),
        x_names=(labels[0], labels[-1]),
    )
    live = await _live_version(db, tenant_id)
    last_run = await db.scalar(
        select(TrainingRun)
        .where(TrainingRun.tenant_id == tenant_id)
        .order_by(TrainingRun.id.desc())
        .limit(1)
    )
    usage = await billing.usage_summary(db, tenant_id=tenant_id, config=billing_config(request))
    return await render(
        request,
        db,
        s,
        "overview.html",
        totals=totals,
        volume_chart=volume,
        up_rate_chart=up_rate,
        live=live,
        last_run=last_run,
        usage=usage,
    )


async def _live_version(db: AsyncSession, tenant_id: str) -> AdapterVersion | None:
    live_id = await deployments.live_version_id(db, tenant_id=tenant_id)
    return await db.get(AdapterVersion, live_id) if live_id else None


# --- runs --------------------------------------------------------------------------------------


@router.get("/runs")
async def run_list(
    request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    rows = list(
        await db.scalars(
            select(TrainingRun)
            .where(TrainingRun.tenant_id == tenant_id)
            .order_by(TrainingRun.id.desc())
            .limit(100)
        )
    )
    estimate = await billing.estimate_run_cost(
        db, tenant_id=tenant_id, config=billing_config(request)
    )
    return await render(request, db, s, "runs.html", rows=rows, estimate=estimate)


@router.post("/runs")
async def run_start(
    request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    run, started = await orchestrator(request).start_run(
        db, tenant_id=tenant_id, trigger="dashboard"
    )
    return back_to(f"/dashboard/runs/{run.id}", "run_started" if started else "run_running")


async def _live_context(db: AsyncSession, tenant_id: str, run: TrainingRun) -> dict[str, Any]:
    events = list(
        await db.scalars(
            select(RunEvent)
            .where(RunEvent.tenant_id == tenant_id, RunEvent.run_id == run.id)
            .order_by(RunEvent.id)
        )
    )
    metrics = [e.data or {} for e in events if e.type == "metrics"]
    loss = charts.Series("loss", [(m["step"], m["loss"]) for m in metrics if _num(m, "loss")])
    logged = {k for m in metrics for k in m}
    if "reward" in logged:
        # GRPO: the weighted reward, and each reward function's mean (judge, answer check).
        names = {
            k: k.split("/")[1] for k in logged if k.startswith("rewards/") and k.endswith("/mean")
        }
        reward_keys = {"reward": "reward (weighted)", **dict(sorted(names.items()))}
    else:  # DPO/KTO: implicit rewards of the chosen and rejected answers, and their margin
        reward_keys = {k: k for k in sorted(k for k in logged if k.startswith("rewards/"))[:3]}
    rewards = [
        charts.Series(label, [(m["step"], m[k]) for m in metrics if _num(m, k)])
        for k, label in reward_keys.items()
    ]
    # GRPO logs the per-token KL its beta penalizes; KTO, its batch's KL estimate.
    kl = charts.Series("KL", [(m["step"], m["kl"]) for m in metrics if _num(m, "kl")])
    progress = run.progress or {}
    total = progress.get("total_steps") or 0
    percent = min(100, round(100 * progress.get("step", 0) / total)) if total else None
    approval = await _approval(db, tenant_id, run)
    return {
        "run": run,
        "active": run.status in ACTIVE,
        # Nothing moves while a run waits for an answer: the page stops refreshing itself, so
        # the approval forms stay as the admin fills them in.
        "polling": run.status in ACTIVE and approval is None,
        "approval": approval,
        "percent": percent,
        "progress": progress,
        "loss_chart": charts.line_chart("Training loss", [loss], x_label="steps"),
        "reward_chart": charts.line_chart("Rewards", rewards, x_label="steps") if rewards else None,
        "kl_chart": (
            charts.line_chart("KL to the base model", [kl], x_label="steps") if kl.points else None
        ),
        # Metrics are in the charts; the log keeps what a person reads.
        "events": [e for e in events if e.type != "metrics"],
    }


async def _approval(db: AsyncSession, tenant_id: str, run: TrainingRun) -> dict[str, Any] | None:
    """The candidate a run waits on an admin for, with its deadline and eval report rows."""
    if not awaiting_approval(run) or run.adapter_version_id is None:
        return None
    version = await db.get(AdapterVersion, run.adapter_version_id)
    if version is None or version.tenant_id != tenant_id:
        return None
    until = (run.progress or {}).get("waiting_until")
    return {
        "version": version,
        "until": datetime.fromisoformat(until) if isinstance(until, str) else None,
        "rows": REPORT_ROWS,
        "max_reason": MAX_DECISION_REASON,
    }


def _num(m: dict[str, Any], key: str) -> bool:
    v = m.get(key)
    return isinstance(v, int | float) and "step" in m and math.isfinite(v)


@router.get("/runs/{run_id}")
async def run_page(
    run_id: str, request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    run = await find_run(db, tenant_id=tenant_id, run_id=run_id)
    return await render(request, db, s, "run.html", **await _live_context(db, tenant_id, run))


@router.get("/runs/{run_id}/live")
async def run_live(
    run_id: str, request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    """The live section alone, for the page's script to swap in while the run is active."""
    run = await find_run(db, tenant_id=tenant_id, run_id=run_id)
    return await render(request, db, s, "run_live.html", **await _live_context(db, tenant_id, run))


@router.post("/runs/{run_id}/cancel")
async def run_cancel(
    run_id: str, request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    run = await find_run(db, tenant_id=tenant_id, run_id=run_id)
    if run.status in ACTIVE:
        await orchestrator(request).cancel(run)
    return back_to(f"/dashboard/runs/{run.id}", "cancel_requested")


@router.post("/runs/{run_id}/approve")
async def run_approve(
    run_id: str, request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    run = await find_run(db, tenant_id=tenant_id, run_id=run_id)
    by = await keys.key_label(db, key_id=s.key_id)
    await orchestrator(request).decide(db, run=run, approve=True, by=by)
    return back_to(f"/dashboard/runs/{run.id}", "approved")


@router.post("/runs/{run_id}/reject")
async def run_reject(
    run_id: str,
    request: Request,
    db: SessionDep,
    s: CheckedUser,
    tenant_id: TenantId,
    reason: Annotated[str, Form(max_length=MAX_DECISION_REASON)] = "",
) -> Response:
    run = await find_run(db, tenant_id=tenant_id, run_id=run_id)
    by = await keys.key_label(db, key_id=s.key_id)
    await orchestrator(request).decide(db, run=run, approve=False, by=by, reason=reason)
    return back_to(f"/dashboard/runs/{run.id}", "rejected")


# --- adapters ----------------------------------------------------------------------------------

# The eval-report rows shown side by side, in this order.
REPORT_ROWS = (
    ("judge_auroc", "Thumbs judge: held-out AUROC"),
    ("win_rate", "Win rate vs the version it replaced (judge)"),
    ("thumbs_auroc_candidate", "Held-out thumbs AUROC (implicit reward)"),
    ("thumbs_auroc_current", "… of the version it replaced"),
    ("pref_accuracy_candidate", "Held-out pair accuracy"),
    ("pref_accuracy_current", "… of the version it replaced"),
    ("capability", "Capability suite pass rate, base → candidate"),
    ("regression_kl", "Regression KL (nats)"),
    ("regression_ppl_increase", "Perplexity change"),
    ("current", "Compared with"),
)
"""Each metric with an interval shows it as ``value [low, high] n=N`` from the report's ``ci``."""


@router.get("/adapters")
async def adapter_list(
    request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    versions = await deployments.list_versions(db, tenant_id=tenant_id)
    live_id = await deployments.live_version_id(db, tenant_id=tenant_id)
    return await render(
        request,
        db,
        s,
        "adapters.html",
        versions=versions,
        live_id=live_id,
        rows=REPORT_ROWS,
        canary=await _canary_panel(db, tenant_id),
        canary_percent=CANARY_PERCENT,
    )


CANARY_PERCENT = (round(MIN_CANARY_FRACTION * 100, 6), round(MAX_CANARY_FRACTION * 100, 6))
"""The share of end users a canary may take, in percent as the form asks (rounded: a fraction
times 100 need not come out whole in floating point, and a bound of 7.000000000000001 would
refuse the 7 it names)."""


async def _canary_panel(db: AsyncSession, tenant_id: str) -> dict[str, Any] | None:
    """The running canary: its split, each arm's thumbs and up-rate with its 95 % interval (on
    the thumbs worth of independent evidence, as the decision rule counts them), and how
    P(candidate better) moved, as a chart."""
    canary = await deployments.current_canary(db, tenant_id=tenant_id)
    if canary is None:
        return None
    arms = {}
    for name, arm in (("current", canary.current), ("candidate", canary.candidate)):
        up, down = arm.effective()
        arms[name] = {"arm": arm, "rate": proportion(up, up + down) if up + down else None}
    history = await deployments.p_better_over_time(db, tenant_id=tenant_id)
    minutes = not history or history[-1][0] < 2  # a young canary's axis in minutes
    scale, unit = (60, "minutes") if minutes else (1, "hours")
    chart = charts.line_chart(
        "P(candidate better) as thumbs came in",
        [charts.Series("P(candidate better)", [(h * scale, p * 100) for h, p in history])],
        x_label=unit,
        y_format=lambda v: f"{v:.0f}%",
        y_range=(0, 100),
    )
    return {"canary": canary, "arms": arms, "chart": chart}


@router.post("/adapters/rollback")
async def adapter_rollback(
    request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    # Through the placement: the version rolled back is unloaded from the serving tier at once.
    await placement(request).rollback(db, tenant_id=tenant_id)
    return back_to("/dashboard/adapters", "rolled_back")


@router.post("/adapters/{version_id}/promote")
async def adapter_promote(
    version_id: str, request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    await placement(request).promote(db, tenant_id=tenant_id, version_id=version_id)
    return back_to("/dashboard/adapters", "promoted")


@router.post("/deployment/canary")
async def canary_start(
    request: Request,
    db: SessionDep,
    s: CheckedUser,
    tenant_id: TenantId,
    version_id: Annotated[str, Form(min_length=1, max_length=40)],
    percent: Annotated[float, Form(ge=CANARY_PERCENT[0], le=CANARY_PERCENT[1])] = 10,
) -> Response:
    await placement(request).start_canary(
        db, tenant_id=tenant_id, version_id=version_id, fraction=percent / 100
    )
    return back_to("/dashboard/adapters", "canary_started")


async def _end_canary(request: Request, db: AsyncSession, tenant_id: str, promote: bool) -> None:
    await placement(request).conclude_canary(
        db, tenant_id=tenant_id, promote=promote, reason=deployments.BY_ADMIN[promote]
    )


@router.post("/deployment/canary/promote")
async def canary_promote(
    request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    await _end_canary(request, db, tenant_id, promote=True)
    return back_to("/dashboard/adapters", "canary_promoted")


@router.post("/deployment/canary/abort")
async def canary_abort(
    request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    await _end_canary(request, db, tenant_id, promote=False)
    return back_to("/dashboard/adapters", "canary_aborted")


# --- data --------------------------------------------------------------------------------------


@router.get("/data")
async def data_page(
    request: Request,
    db: SessionDep,
    s: SessionUser,
    tenant_id: TenantId,
    rating: Literal["all", "up", "down"] = "all",
    user: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    datasets = list(
        await db.scalars(
            select(Dataset)
            .where(Dataset.tenant_id == tenant_id)
            .order_by(Dataset.created_at.desc())
            .limit(20)
        )
    )
    page, next_cursor = await list_feedback(
        db,
        tenant_id=tenant_id,
        limit=50,
        cursor=cursor,
        rating={"all": None, "up": 1, "down": -1}[rating],
        user_id=user or None,
    )
    return await render(
        request,
        db,
        s,
        "data.html",
        datasets=datasets,
        feedback=page,
        next_cursor=next_cursor,
        rating=rating,
        user=user or "",
    )


# --- usage -------------------------------------------------------------------------------------


@router.get("/usage")
async def usage_page(
    request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    usage = await billing.usage_summary(db, tenant_id=tenant_id, config=billing_config(request))
    return await render(request, db, s, "usage.html", usage=usage)


# --- settings: policy and keys -----------------------------------------------------------------


def _policy_fields(policy: TrainingPolicy) -> list[dict[str, Any]]:
    """One form input per policy field, derived from the model so new fields show up."""
    fields = []
    for name, info in TrainingPolicy.model_fields.items():
        annotation = info.annotation
        optional = type(None) in get_args(annotation)
        # ``X | None`` → X; a bare Literal's args are its values, so only unwrap real unions.
        inner = (
            next(a for a in get_args(annotation) if a is not type(None)) if optional else annotation
        )
        kind = "text"
        choices: list[str] = []
        if inner is bool:
            kind = "checkbox"
        elif get_origin(inner) is Literal:
            kind = "select"
            choices = [str(c) for c in get_args(inner)]
        elif inner in (int, float):
            kind = "number"
        value = getattr(policy, name)
        fields.append(
            {
                "name": name,
                "kind": kind,
                "choices": choices,
                "value": "" if value is None else value,
                "optional": optional,
                "help": info.description or "",
            }
        )
    return fields


async def _settings(
    request: Request,
    db: AsyncSession,
    s: DashboardSession,
    tenant_id: str,
    *,
    policy: TrainingPolicy | None = None,
    errors: list[str] | None = None,
    new_key: keys.IssuedKey | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    tenant = await tenants.get_tenant(db, tenant_id=tenant_id)
    rows = await keys.list_keys(db, tenant_id=tenant_id)
    return await render(
        request,
        db,
        s,
        "settings.html",
        status_code=status_code,
        fields=_policy_fields(policy or policy_of(tenant.policy)),
        errors=errors or [],
        keys=rows,
        new_key=new_key,
    )


@router.get("/settings")
async def settings_page(
    request: Request, db: SessionDep, s: SessionUser, tenant_id: TenantId
) -> Response:
    return await _settings(request, db, s, tenant_id)


@router.post("/settings/policy")
async def policy_save(
    request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    form = await request.form()
    raw: dict[str, Any] = {}
    for name, info in TrainingPolicy.model_fields.items():
        value = form.get(name)
        if info.annotation is bool:
            raw[name] = value == "on"
        elif isinstance(value, str) and value.strip() != "":
            raw[name] = value.strip()
        elif type(None) in get_args(info.annotation):
            raw[name] = None
    try:
        policy = TrainingPolicy.model_validate(raw)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        current_policy = TrainingPolicy.model_construct(**raw)
        return await _settings(
            request, db, s, tenant_id, policy=current_policy, errors=errors, status_code=422
        )
    await save_policy(request, db, tenant_id=tenant_id, policy=policy)
    return back_to("/dashboard/settings", "policy_saved")


@router.post("/settings/keys")
async def key_create(
    request: Request,
    db: SessionDep,
    s: CheckedUser,
    tenant_id: TenantId,
    role: Annotated[Literal["admin", "product"], Form()],
    name: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    issued = await keys.create_key(db, tenant_id=tenant_id, role=KeyRole(role), name=name.strip())
    await db.commit()
    # Rendered, not redirected: the secret exists in this response only.
    response = await _settings(request, db, s, tenant_id, new_key=issued, status_code=201)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/settings/keys/{key_id}/revoke")
async def key_revoke(
    key_id: str, request: Request, db: SessionDep, s: CheckedUser, tenant_id: TenantId
) -> Response:
    if key_id == s.key_id:
        raise InvalidInput("you are logged in with this key; log in with another one to revoke it")
    key = await keys.revoke_key(db, tenant_id=tenant_id, key_id=key_id)
    await db.commit()
    request.app.state.principal_cache.forget(key_id=key.id)
    return back_to("/dashboard/settings", "key_revoked")


@router.get("/{rest:path}")
async def not_found(rest: str, request: Request, s: SessionUser) -> Response:
    raise NotFound("there is no such dashboard page")
