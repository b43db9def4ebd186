"""The dashboard over real HTTP (ASGI) on both databases: login, sessions, CSRF, scoping, and
every page and form. The browser test drives the same pages in Chromium."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from core import deployments
from core.db import create_sessionmaker
from core.models import (
    AdapterStatus,
    AdapterVersion,
    Dataset,
    Feedback,
    Interaction,
    RunEvent,
    RunStatus,
    TrainingRun,
)
from tests.conftest import Backend, TenantKeys, dashboard_login
from tests.dashboard.conftest import Session, csrf_of

PAGES = [
    "/dashboard",
    "/dashboard/runs",
    "/dashboard/adapters",
    "/dashboard/data",
    "/dashboard/usage",
    "/dashboard/settings",
]


async def seed(backend: Backend, tenant: TenantKeys, marker: str) -> dict[str, str]:
    """A finished run with metrics, its dataset and two adapter versions, straight into the DB."""
    async with create_sessionmaker(backend.engine)() as db:
        run = TrainingRun(tenant_id=tenant.id, status=RunStatus.succeeded, method="dpo")
        db.add(run)
        await db.flush()
        for step in (1, 2, 3):
            db.add(
                RunEvent(
                    tenant_id=tenant.id,
                    run_id=run.id,
                    level="info",
                    type="metrics",
                    message=f"step {step}/3",
                    data={
                        "step": step,
                        "total_steps": 3,
                        "loss": 0.7 - 0.1 * step,
                        "rewards/margins": 0.1 * step,
                    },
                )
            )
        db.add(
            RunEvent(
                tenant_id=tenant.id,
                run_id=run.id,
                level="info",
                type="message",
                message=f"promoted {marker}",
                data=None,
            )
        )
        db.add(
            Dataset(
                tenant_id=tenant.id,
                run_id=run.id,
                content_hash=secrets.token_hex(32),
                counts={},
                data_card={
                    "records_in": 40,
                    "records_used": 38,
                    "thumbs_up": 20,
                    "thumbs_down": 18,
                    "pairs_train": 15,
                    "pii_found": {"email": 2},
                },
                uri=f"datasets/{marker}",
            )
        )
        versions = []
        for i in range(2):
            v = AdapterVersion(
                tenant_id=tenant.id,
                run_id=run.id,
                sha256=secrets.token_hex(32),
                serving_name=f"{marker}-v{i}",
                uri=f"tenants/{tenant.id}/adapters/{marker}-v{i}",
                base_model="tiny-random",
                rank=4,
                status=AdapterStatus.candidate,
                eval_report={
                    "current": "base",
                    "pref_accuracy_candidate": 0.75 + i / 10,
                    "pref_accuracy_current": 0.5,
                    "pref_improvement": 0.25 + i / 10,
                    "regression_kl": 0.01,
                    "judge_trusted": True,
                    "judge": {"trusted": True, "reason": "…", "features": "text statistics"},
                    "capability_base": 0.5,
                    "capability_candidate": 0.48,
                    "n_capability": 93,
                    "ci": {
                        "pref_accuracy_candidate": {
                            "value": 0.75 + i / 10,
                            "low": 0.5,
                            "high": 0.9,
                            "n": 12,
                        },
                        "win_rate": {"value": 0.7, "low": 0.56, "high": 0.81, "n": 50},
                        "judge_auroc": {"value": 0.88, "low": 0.82, "high": 0.94, "n": 112},
                    },
                    "samples": [
                        {
                            "prompt": [{"role": "user", "content": f"held-out question {i}?"}],
                            "current": "the answer before",
                            "candidate": f"the answer of version {i}",
                            "current_score": 0.31,
                            "candidate_score": 0.82,
                        }
                    ],
                },
            )
            db.add(v)
            versions.append(v)
        await db.commit()
        return {"run": run.id, "v0": versions[0].id, "v1": versions[1].id}


async def form(c: httpx.AsyncClient, page: str, action: str, **data: Any) -> httpx.Response:
    """Submit a form the way a browser would: with the CSRF token of the page it sits on."""
    r = await c.get(page)
    assert r.status_code == 200, r.text
    return await c.post(action, data={"csrf_token": csrf_of(r.text), **data})


async def test_login_sets_a_safe_session_cookie(anonymous: httpx.AsyncClient, tenant: TenantKeys):
    r = await anonymous.get("/dashboard/runs")
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/login?next=/dashboard/runs"
    page = await anonymous.get(r.headers["location"])
    assert page.status_code == 200 and "Log in" in page.text

    r = await dashboard_login(anonymous, tenant.admin, next="/dashboard/runs")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/runs"
    cookie = r.headers["set-cookie"].lower()
    for flag in ("httponly", "samesite=lax", "path=/dashboard", "max-age="):
        assert flag in cookie, cookie
    assert tenant.admin not in r.headers["set-cookie"]  # the key itself never goes in the cookie
    assert (await anonymous.get("/dashboard/runs")).status_code == 200


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        ("tl_anothing_garbage", 401, "unknown API key"),
        ("not a key", 401, "malformed API key"),
        ("", 401, "malformed API key"),
    ],
)
async def test_bad_logins_say_why(
    anonymous: httpx.AsyncClient, key: str, status: int, message: str
):
    r = await dashboard_login(anonymous, key)
    assert r.status_code == status
    assert message in r.text and "<form" in r.text
    assert "tuneloop_session" not in r.headers.get("set-cookie", "")


async def test_another_sites_login_form_logs_nobody_in(
    anonymous: httpx.AsyncClient, tenant: TenantKeys
):
    # Login CSRF: a page elsewhere posts the attacker's key to log the visitor in as the
    # attacker. Its post carries no form token (and the browser sends no SameSite=Strict cookie).
    for data in ({"key": tenant.admin}, {"key": tenant.admin, "login_token": "guessed"}):
        r = await anonymous.post("/dashboard/login", data=data)
        assert r.status_code == 403 and "did not come from the dashboard" in r.text
        assert "tuneloop_session" not in r.headers.get("set-cookie", "")


async def test_product_keys_and_open_redirects_are_refused(
    anonymous: httpx.AsyncClient, tenant: TenantKeys
):
    r = await dashboard_login(anonymous, tenant.product)
    assert r.status_code == 403 and "log in with a tenant admin key" in r.text
    outside = ["https://evil.example/", "//evil.example", "/dashboard/../v1/keys"]
    outside += ["/dashboard//evil.example", "/dashboardx", "/dashboard/./runs", "\\evil"]
    for target in outside:
        r = await dashboard_login(anonymous, tenant.admin, next=target)
        assert r.headers["location"] == "/dashboard", target
    r = await dashboard_login(anonymous, tenant.admin, next="/dashboard/runs")
    assert r.headers["location"] == "/dashboard/runs"


async def test_a_grpo_run_page_plots_reward_and_kl_beside_the_loss(
    login: Session, tenant: TenantKeys, backend: Backend
) -> None:
    async with create_sessionmaker(backend.engine)() as db:
        run = TrainingRun(tenant_id=tenant.id, status=RunStatus.running, method="grpo")
        db.add(run)
        await db.flush()
        for step in (1, 2, 3):
            data = {"step": step, "total_steps": 3, "loss": 0.01 * step, "kl": 0.02 * step}
            data |= {"reward": 0.5 + 0.1 * step, "reward_std": 0.2}
            data |= {"rewards/judge/mean": 0.4 + 0.1 * step, "rewards/judge/std": 0.1}
            data |= {"rewards/answer_check/mean": 1.0, "frac_reward_zero_std": 0.25}
            db.add(
                RunEvent(
                    tenant_id=tenant.id,
                    run_id=run.id,
                    level="info",
                    type="metrics",
                    message=f"step {step}/3",
                    data=data,
                )
            )
        await db.commit()
        run_id = run.id
    c = await login(tenant.admin)
    page = (await c.get(f"/dashboard/runs/{run_id}")).text
    for series in ("loss", "reward (weighted)", "judge", "answer_check", "KL"):
        assert f'data-series="{series}"' in page, series
    assert 'data-series="rewards/judge/std"' not in page  # spreads stay in the log's data
    assert page.count('<svg class="chart"') == 3 and 'id="kl-chart"' in page


async def test_every_page_renders_for_an_admin(
    login: Session, tenant: TenantKeys, backend: Backend, client: httpx.AsyncClient
):
    marker = f"m{secrets.token_hex(4)}"
    ids = await seed(backend, tenant, marker)
    fb = await client.post(
        "/v1/feedback",
        headers=tenant.auth(),
        json={
            "items": [
                {
                    "prompt": "p",
                    "completion": f"answer {marker}",
                    "rating": "up",
                    "comment": f"great {marker}",
                    "user_id": "u-1",
                }
            ]
        },
    )
    assert fb.status_code == 201, fb.text
    c = await login(tenant.admin)
    for page in PAGES:
        r = await c.get(page)
        assert r.status_code == 200, (page, r.text)
        assert tenant.slug in r.text  # the tenant's name is on every page
        assert 'name="csrf_token"' in r.text  # the logout form at least
    overview = (await c.get("/dashboard")).text
    assert overview.count('<svg class="chart"') == 2 and 'class="bar"' in overview
    run = (await c.get(f"/dashboard/runs/{ids['run']}")).text
    assert 'data-series="loss"' in run and 'data-series="rewards/margins"' in run
    assert f"promoted {marker}" in run
    adapters = (await c.get("/dashboard/adapters")).text
    assert f"{marker}-v0" in adapters and '75% <span class="ci">[50%, 90%] n=12' in adapters
    assert "70%" in adapters and "n=50" in adapters and "50% → 48%" in adapters
    assert "88%" in adapters and "may decide; learned on text statistics" in adapters
    assert "held-out question 0?" in adapters and "the answer of version 1" in adapters
    data = (await c.get("/dashboard/data")).text
    assert f"great {marker}" in data and "email 2" in data and "38 / 40" in data
    down_only = (await c.get("/dashboard/data", params={"rating": "down"})).text
    assert f"great {marker}" not in down_only
    bad = await c.get("/dashboard/data", params={"rating": "sideways"})
    assert bad.status_code == 422 and "<html" in bad.text and "rating" in bad.text
    usage = (await c.get("/dashboard/usage")).text
    assert "inference tokens" in usage and "training tokens" in usage


async def test_state_changes_need_the_sessions_csrf_token(
    login: Session, make_tenant: Any, backend: Backend
):
    a, b = await make_tenant(), await make_tenant()
    ids = await seed(backend, a, f"m{secrets.token_hex(4)}")
    ca, cb = await login(a.admin), await login(b.admin)
    action = f"/dashboard/adapters/{ids['v0']}/promote"
    assert (await ca.post(action)).status_code == 403
    assert (await ca.post(action, data={"csrf_token": "forged"})).status_code == 403
    other = csrf_of((await cb.get("/dashboard")).text)
    r = await ca.post(action, data={"csrf_token": other})
    assert r.status_code == 403 and "reload the page" in r.text
    adapters = (await ca.get("/dashboard/adapters")).text
    assert "the base model" in adapters  # nothing was promoted

    r = await form(ca, "/dashboard/adapters", action)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/adapters?notice=promoted"
    page = (await ca.get(r.headers["location"])).text
    assert "now answers" in page and 'class="badge">live' in page


async def test_promote_and_rollback(
    login: Session, tenant: TenantKeys, backend: Backend, client: httpx.AsyncClient
):
    ids = await seed(backend, tenant, f"m{secrets.token_hex(4)}")
    c = await login(tenant.admin)
    for v in ("v0", "v1"):
        r = await form(c, "/dashboard/adapters", f"/dashboard/adapters/{ids[v]}/promote")
        assert r.status_code == 303
    live = await client.get("/v1/adapters", headers=tenant.auth("admin"))
    assert [a["id"] for a in live.json()["data"] if a["live"]] == [ids["v1"]]
    r = await form(c, "/dashboard/adapters", "/dashboard/adapters/rollback")
    assert r.status_code == 303
    live = await client.get("/v1/adapters", headers=tenant.auth("admin"))
    assert [a["id"] for a in live.json()["data"] if a["live"]] == [ids["v0"]]
    await form(c, "/dashboard/adapters", "/dashboard/adapters/rollback")
    r = await form(c, "/dashboard/adapters", "/dashboard/adapters/rollback")
    assert r.status_code == 409 and "nothing to roll back" in r.text and "<html" in r.text


async def rate_canary_answers(
    backend: Backend,
    tenant: TenantKeys,
    thumbs: dict[str, list[tuple[str, int]]],
    versions: dict[str, str],
) -> None:
    """Answers ``default`` gave on each canary arm, by that arm's version (``versions``), and
    their thumbs ((user, rating) each), straight into the DB (the seeded versions have no
    weights to serve)."""
    async with create_sessionmaker(backend.engine)() as db:
        for arm, rated in thumbs.items():
            for user, rating in rated:
                answer = Interaction(
                    tenant_id=tenant.id,
                    model="default",
                    messages=[{"role": "user", "content": "hi"}],
                    completion="hello",
                    canary_arm=arm,
                    adapter_version_id=versions[arm],
                )
                db.add(answer)
                await db.flush()
                db.add(
                    Feedback(
                        tenant_id=tenant.id, interaction_id=answer.id, rating=rating, user_id=user
                    )
                )
        await db.commit()


async def test_the_canary_panel_shows_the_arms_and_an_admin_ends_it(
    login: Session, make_tenant: Any, backend: Backend, client: httpx.AsyncClient
):
    tenant, other = await make_tenant(), await make_tenant()
    ids = await seed(backend, tenant, f"m{secrets.token_hex(4)}")
    more = await seed(backend, tenant, f"m{secrets.token_hex(4)}")
    foreign = await seed(backend, other, f"m{secrets.token_hex(4)}")
    c = await login(tenant.admin)
    await form(c, "/dashboard/adapters", f"/dashboard/adapters/{ids['v0']}/promote")
    page = (await c.get("/dashboard/adapters")).text
    assert 'id="canary"' not in page and page.count("Start a canary") == 3

    start = "/dashboard/deployment/canary"
    r = await form(c, "/dashboard/adapters", start, version_id=foreign["v0"], percent="50")
    assert r.status_code == 404  # another tenant's version does not exist here
    r = await form(c, "/dashboard/adapters", start, version_id=ids["v1"], percent="90")
    assert r.status_code == 422  # above the largest share a canary may have
    r = await form(c, "/dashboard/adapters", start, version_id=ids["v1"], percent="50")
    assert r.status_code == 303 and r.headers["location"].endswith("notice=canary_started")
    await rate_canary_answers(
        backend,
        tenant,
        {
            "current": [(f"u{i}", 1 if i % 2 else -1) for i in range(20)],
            "candidate": [(f"w{i}", 1 if i % 5 else -1) for i in range(20)],
        },
        {"current": ids["v0"], "candidate": ids["v1"]},
    )
    page = (await c.get("/dashboard/adapters")).text
    assert 'id="canary"' in page and 'id="canary-split">50%' in page
    assert "Start a canary" not in page  # one canary at a time
    # 10 of 20 up against 16 of 20, each thumb from a user of its own.
    assert '<td class="up">10</td><td class="down">10</td>' in page
    assert '<td class="up">16</td><td class="down">4</td>' in page
    # The interval counts thumbs worth of independent evidence: twenty one-thumb users of
    # one arm are 20/19 as variable as twenty coin flips (the design effect), so n=19.
    assert '79% <span class="ci">[57%, 91%] n=19' in page
    async with create_sessionmaker(backend.engine)() as db:
        canary = await deployments.current_canary(db, tenant_id=tenant.id)
        history = await deployments.p_better_over_time(db, tenant_id=tenant.id)
    assert canary is not None and canary.p_better is not None
    assert f'id="canary-p-better">{canary.p_better * 100:.0f}%' in page
    assert history[-1][1] == pytest.approx(canary.p_better) and len(history) >= 10
    assert 'data-series="P(candidate better)"' in page

    r = await form(c, "/dashboard/adapters", "/dashboard/deployment/canary/abort")
    assert r.status_code == 303 and r.headers["location"].endswith("notice=canary_aborted")
    versions = (await client.get("/v1/adapters", headers=tenant.auth("admin"))).json()["data"]
    by_id = {v["id"]: v for v in versions}
    assert by_id[ids["v0"]]["live"] and by_id[ids["v1"]]["status"] == "rejected"
    assert 'id="canary"' not in (await c.get("/dashboard/adapters")).text

    r = await form(c, "/dashboard/adapters", start, version_id=more["v0"], percent="5")
    assert r.status_code == 303  # the smallest share is allowed
    assert 'id="canary-split">5%' in (await c.get("/dashboard/adapters")).text
    r = await form(c, "/dashboard/adapters", "/dashboard/deployment/canary/promote")
    assert r.status_code == 303 and r.headers["location"].endswith("notice=canary_promoted")
    versions = (await client.get("/v1/adapters", headers=tenant.auth("admin"))).json()["data"]
    assert [v["id"] for v in versions if v["live"]] == [more["v0"]]
    r = await form(c, "/dashboard/adapters", "/dashboard/deployment/canary/promote")
    assert r.status_code == 409 and "no canary is running" in r.text


async def test_a_tenant_never_sees_another_tenants_pages(
    login: Session, make_tenant: Any, backend: Backend, caplog: pytest.LogCaptureFixture
):
    a, b = await make_tenant(), await make_tenant()
    marker = f"m{secrets.token_hex(4)}"
    ids = await seed(backend, a, marker)
    cb = await login(b.admin)
    for path in (
        f"/dashboard/runs/{ids['run']}",
        f"/dashboard/runs/{ids['run']}/live",
        "/dashboard/nowhere",
        f"/dashboard/runs/{ids['run']}/../../adapters/x",
    ):
        r = await cb.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert marker not in r.text and "<html" in r.text
    for action in (
        f"/dashboard/adapters/{ids['v0']}/promote",
        f"/dashboard/runs/{ids['run']}/cancel",
        f"/dashboard/settings/keys/{a.admin_key_id}/revoke",
    ):
        r = await form(cb, "/dashboard", action)
        assert r.status_code == 404, (action, r.text)
    for page in PAGES:
        assert marker not in (await cb.get(page)).text
    probes = [r for r in caplog.records if r.name == "api.dashboard.pages"]
    assert any(
        b.id in r.getMessage() and f"/dashboard/runs/{ids['run']}" in r.getMessage() for r in probes
    ), [r.getMessage() for r in probes]
    assert not any(b.admin in r.getMessage() for r in caplog.records)  # never the key
    # An admin cannot pick another tenant the way a platform key can.
    assert (await cb.get("/dashboard/tenants")).status_code == 404
    r = await form(cb, "/dashboard", "/dashboard/tenants/switch", tenant_id=a.id)
    assert r.status_code == 404
    assert (await cb.get(f"/dashboard/runs/{ids['run']}")).status_code == 404


async def test_platform_keys_switch_tenants(
    login: Session, platform_key: str, tenant: TenantKeys, backend: Backend
):
    marker = f"m{secrets.token_hex(4)}"
    ids = await seed(backend, tenant, marker)
    c = await login(platform_key)
    r = await c.get("/dashboard")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/tenants"
    listing = (await c.get("/dashboard/tenants")).text
    assert tenant.slug in listing
    r = await form(c, "/dashboard/tenants", "/dashboard/tenants/switch", tenant_id=tenant.id)
    assert r.status_code == 303
    assert f"{marker}-v0" in (await c.get("/dashboard/adapters")).text
    assert (await c.get(f"/dashboard/runs/{ids['run']}")).status_code == 200
    r = await form(c, "/dashboard/tenants", "/dashboard/tenants/switch", tenant_id="ten_nope")
    assert r.status_code == 404


async def test_keys_are_shown_once_and_revocation_ends_sessions(
    login: Session, tenant: TenantKeys, anonymous: httpx.AsyncClient
):
    # The API of the same process: revocation is immediate there (others wait out a short cache).
    client = anonymous
    c = await login(tenant.admin)
    r = await form(c, "/dashboard/settings", "/dashboard/settings/keys", role="admin", name="ops")
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    secret = r.text.split('id="new-key-secret">', 1)[1].split("<", 1)[0]
    assert secret.startswith("tl_a")
    assert secret not in (await c.get("/dashboard/settings")).text
    assert (
        await client.get("/v1/runs", headers={"Authorization": f"Bearer {secret}"})
    ).status_code == 200

    second = await login(secret)
    keys = (await client.get("/v1/keys", headers=tenant.auth("admin"))).json()["data"]
    new_id = next(k["id"] for k in keys if k["name"] == "ops")
    r = await form(c, "/dashboard/settings", f"/dashboard/settings/keys/{new_id}/revoke")
    assert r.status_code == 303
    assert (
        await client.get("/v1/runs", headers={"Authorization": f"Bearer {secret}"})
    ).status_code == 401
    r = await second.get("/dashboard/settings")  # that key's dashboard session is over too
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")

    r = await form(
        c, "/dashboard/settings", f"/dashboard/settings/keys/{tenant.admin_key_id}/revoke"
    )
    assert r.status_code == 422 and "logged in with this key" in r.text


async def test_policy_form(login: Session, tenant: TenantKeys, client: httpx.AsyncClient):
    c = await login(tenant.admin)
    page = (await c.get("/dashboard/settings")).text
    assert 'name="min_feedback"' in page and 'name="require_approval"' in page
    assert "<option selected>auto</option><option >dpo</option>" in page
    r = await form(
        c,
        "/dashboard/settings",
        "/dashboard/settings/policy",
        method="kto",
        min_feedback="12",
        rank="8",
        epochs="1.5",
        require_approval="on",
    )
    assert r.status_code == 303, r.text
    policy = (await client.get("/v1/policy", headers=tenant.auth("admin"))).json()
    assert policy["method"] == "kto" and policy["min_feedback"] == 12
    assert policy["require_approval"] is True and policy["fallback_to_base"] is False
    assert policy["max_steps"] is None and policy["epochs"] == 1.5

    r = await form(
        c, "/dashboard/settings", "/dashboard/settings/policy", min_feedback="1", rank="lots"
    )
    assert r.status_code == 422
    assert "min_feedback" in r.text and "rank" in r.text and "not saved" in r.text
    assert 'value="lots"' in r.text  # what was typed stays in the form
    policy = (await client.get("/v1/policy", headers=tenant.auth("admin"))).json()
    assert policy["min_feedback"] == 12


async def test_tampered_or_foreign_cookies_are_ignored(
    login: Session, anonymous: httpx.AsyncClient, tenant: TenantKeys
):
    c = await login(tenant.admin)
    value = c.cookies.get("tuneloop_session", path="/dashboard")
    assert value
    # One character of the signed text changed. (Not the signature's last character: its two
    # low bits are base64 padding, so a signature ending in A, given B, decoded to the same
    # bytes, and the "tampered" cookie was valid in about one run in sixteen.)
    tampered = ("A" if value[0] != "A" else "B") + value[1:]
    anonymous.cookies.set("tuneloop_session", tampered, path="/dashboard")
    r = await anonymous.get("/dashboard")
    assert r.status_code == 303 and "login" in r.headers["location"]


async def test_logout(login: Session, tenant: TenantKeys):
    c = await login(tenant.admin)
    other_browser = await login(tenant.admin)
    stolen = c.cookies.get("tuneloop_session", path="/dashboard")
    r = await form(c, "/dashboard", "/dashboard/logout")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
    assert (await c.get("/dashboard")).status_code == 303
    # Ended on the server, not only in this browser: a copy of the cookie and the key's other
    # sessions are over too; logging in again works at once.
    c.cookies.set("tuneloop_session", stolen, path="/dashboard")
    assert (await c.get("/dashboard")).status_code == 303
    assert (await other_browser.get("/dashboard")).status_code == 303
    again = await login(tenant.admin)
    assert (await again.get("/dashboard")).status_code == 200


async def test_starting_a_run_without_orchestration_is_a_readable_error(
    login: Session, tenant: TenantKeys
):
    c = await login(tenant.admin)
    page = (await c.get("/dashboard/runs")).text
    assert 'id="run-estimate"' in page
    r = await form(c, "/dashboard/runs", "/dashboard/runs")
    assert (
        r.status_code == 503 and "<html" in r.text and "orchestration is not configured" in r.text
    )
