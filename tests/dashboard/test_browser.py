"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright), against a
live uvicorn server whose runs go to the real Temporal dev server and worker on the tiny model.

A person can look at what it saw: a screenshot of every main page is saved under
``tests/artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.artifacts import ArtifactStore
from core.db import create_sessionmaker
from serving import registry
from tests.conftest import Backend, TenantKeys, serve
from tests.serving.adapters import make_adapter
from tests.workflows.conftest import FAST_POLICY, address, setup_tenant

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def sqlite_session(backend: Backend) -> None:
    # One browser pass per session is enough: the page logic is covered on both databases by
    # test_pages.py; this test is about the browser and the live loop.
    if backend.name != "sqlite":
        pytest.skip("the browser test runs once per session, on the SQLite backend")


@pytest.fixture(scope="session")
async def live_url(
    sqlite_session: None, backend: Backend, temporal: WorkflowEnvironment, worker: None
) -> AsyncIterator[str]:
    """The API on a real port, its runs going to the test Temporal server and worker."""
    settings = backend.settings.model_copy(update={"temporal_address": address(temporal)})
    app = create_app(settings, engine=backend.engine)
    async with serve(app) as url:
        yield url
    await app.state.backend.close()


@pytest.fixture(scope="session")
async def browser(sqlite_session: None) -> AsyncIterator[Browser]:
    path = chromium_path()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def log_in(browser: Browser, base: str, key: str) -> Page:
    context = await browser.new_context(base_url=base, viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    await page.goto("/dashboard")
    await expect(page).to_have_url(f"{base}/dashboard/login?next=/dashboard")
    await page.fill("input[name=key]", key)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{base}/dashboard")
    return page


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def test_an_admin_runs_the_loop_from_the_browser(
    sqlite_session: None,
    live_url: str,
    browser: Browser,
    make_tenant: Any,
    client: httpx.AsyncClient,
) -> None:
    a: TenantKeys = await make_tenant()
    b: TenantKeys = await make_tenant()
    # Feedback to train on, and a policy with enough steps that the page's 2 s refresh sees the
    # progress move even on an idle machine.
    await setup_tenant(client, a, feedback=30, max_steps=60)

    page = await log_in(browser, live_url, a.admin)
    await expect(page.locator("#feedback-total")).to_have_text("60")
    assert await page.locator("svg.chart").count() == 2
    assert await page.locator("svg.chart rect.bar").count() >= 2  # today's up and down
    await shot(page, "overview")

    # Start a run and watch it progress on its page, without reloading.
    await page.click("text=Runs")
    await expect(page.locator("#run-estimate")).to_contain_text("$")
    await shot(page, "runs")
    await page.click("#start-run")
    await expect(page.locator(".notice")).to_have_text("Run started.")
    await page.evaluate("window.__no_reload = true")
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = (await page.locator("#run-status").inner_text()).strip()
        step = (await page.locator("#run-step").inner_text()).strip()
        if not seen or seen[-1] != f"{status} {step}":
            seen.append(f"{status} {step}")
        if status in ("succeeded", "failed", "cancelled", "skipped"):
            break
        await asyncio.sleep(0.3)
    assert await page.evaluate("window.__no_reload") is True, "the page reloaded"
    assert seen[-1].startswith("succeeded"), seen
    assert len(seen) >= 3, f"no progress was shown while the run went on: {seen}"
    no_step = "\N{EN DASH} / \N{EN DASH}"
    assert any(s.startswith("running") and not s.endswith(no_step) for s in seen), seen
    assert await page.locator('polyline[data-series="loss"]').count() == 1
    await expect(page.locator("#events")).to_contain_text("promoted")
    await shot(page, "run")

    # The run promoted its version; roll back to the base model, then promote it again.
    await page.click("text=Adapters")
    live_name = (await page.locator("#live-version").inner_text()).strip()
    assert live_name.startswith("t") and live_name != "the base model", live_name
    live_id = await page.locator("#versions th.live").get_attribute("id")
    await shot(page, "adapters")
    await page.click("#rollback")
    await expect(page.locator(".notice")).to_contain_text("Rolled back")
    await expect(page.locator("#live-version")).to_have_text("the base model")
    await page.click("button.promote >> nth=0")
    await expect(page.locator(".notice")).to_contain_text("Promoted")
    await expect(page.locator("#live-version")).to_have_text(live_name)
    r = await client.post(
        "/v1/chat/completions",
        headers=a.auth(),
        json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200 and r.headers["x-served-by"] == live_id, r.text

    # Keys: create one (shown once), then revoke it.
    await page.click("text=Settings")
    await page.fill("input[name=name]", "browser-made")
    await page.select_option("select[name=role]", "product")
    await page.click("#create-key")
    secret = (await page.locator("#new-key-secret").inner_text()).strip()
    assert secret.startswith("tl_k")
    await shot(page, "settings")
    ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert ok.status_code == 200
    row = page.locator("#keys tr", has_text="browser-made")
    await row.locator("button.revoke").click()
    await expect(page.locator(".notice")).to_contain_text("Key revoked")
    await expect(page.locator("#keys tr", has_text="browser-made")).to_contain_text("UTC")

    await page.click("text=Data")
    await expect(page.locator("#datasets")).to_contain_text("/ 60")
    await shot(page, "data")
    await page.click("text=Usage & billing")
    await expect(page.locator("#usage-total")).to_contain_text("$")
    await shot(page, "usage")

    # A long run, cancelled from its page while it trains.
    r = await client.put(
        "/v1/policy", headers=a.auth("admin"), json=FAST_POLICY | {"max_steps": 5000}
    )
    assert r.status_code == 200, r.text
    await page.click("text=Runs")
    await page.click("#start-run")
    await expect(page.locator("#run-status")).to_have_text("running", timeout=60_000)
    await expect(page.locator("#run-progress")).to_be_visible(timeout=60_000)
    await page.click("#cancel-run")
    await expect(page.locator(".notice")).to_contain_text("Cancellation requested")
    await expect(page.locator("#run-status")).to_have_text("cancelled", timeout=60_000)

    # Tenant B's session cannot open tenant A's pages.
    await page.click("text=Runs")
    run_path = await page.locator("#runs a >> nth=0").get_attribute("href")
    assert run_path and run_path.startswith("/dashboard/runs/run_")
    other = await log_in(browser, live_url, b.admin)
    response = await other.goto(run_path)
    assert response is not None and response.status == 404
    await expect(other.locator("h1")).to_have_text("Not found")
    await shot(other, "not-found")
    await other.goto("/dashboard/adapters")
    assert live_name not in await other.content()


async def test_an_admin_watches_a_canary_and_ends_it_from_the_browser(
    sqlite_session: None,
    live_url: str,
    browser: Browser,
    make_tenant: Any,
    client: httpx.AsyncClient,
    backend: Backend,
    tmp_path: Path,
) -> None:
    a: TenantKeys = await make_tenant()
    store = ArtifactStore(backend.settings.data_dir / "artifacts")
    ids = []
    async with create_sessionmaker(backend.engine)() as s:
        for seed in (61, 62, 63):
            adapter = make_adapter(backend.settings.data_dir, tmp_path / f"a{seed}", seed=seed)
            version = await registry.register_adapter(
                s, store, tenant_id=a.id, adapter_dir=adapter, base_model="tiny-random"
            )
            ids.append(version.id)
    live, candidate, later = ids
    page = await log_in(browser, live_url, a.admin)
    await page.click("text=Adapters")
    await page.click(f'button.promote[data-version="{live}"]')
    await expect(page.locator(".notice")).to_contain_text("Promoted")
    start = page.locator("form.canary-start", has=page.locator(f'[data-version="{candidate}"]'))
    await start.locator("input[name=percent]").fill("50")
    await start.locator("button").click()
    await expect(page.locator(".notice")).to_contain_text("Canary started")
    await expect(page.locator("#canary-split")).to_have_text("50%")

    # End users ask for `default` and rate what they got; each stays on one arm.
    rated = {live: 0, candidate: 0}
    current_ups = 0
    for i in range(24):
        r = await client.post(
            "/v1/chat/completions",
            headers=a.auth(),
            json={
                "model": "default",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "user": f"user-{i}",
            },
        )
        assert r.status_code == 200, r.text
        served = r.headers["x-served-by"]
        rated[served] += 1
        up = "up" if served == candidate or i % 2 else "down"
        current_ups += served == live and up == "up"
        r = await client.post(
            "/v1/feedback",
            headers=a.auth(),
            json={"interaction_id": r.json()["id"], "rating": up, "user_id": f"user-{i}"},
        )
        assert r.status_code in (200, 201, 202), r.text
    assert rated[live] and rated[candidate]
    await page.reload()
    await expect(page.locator("#arm-candidate .up")).to_have_text(str(rated[candidate]))
    await expect(page.locator("#arm-candidate .down")).to_have_text("0")
    await expect(page.locator("#arm-current .up")).to_have_text(str(current_ups))
    await expect(page.locator("#arm-current .down")).to_have_text(str(rated[live] - current_ups))
    await expect(page.locator('polyline[data-series="P(candidate better)"]')).to_have_count(1)
    await shot(page, "canary")

    await page.click("#canary-abort")
    await expect(page.locator(".notice")).to_contain_text("Canary aborted")
    await expect(page.locator("#canary")).to_have_count(0)
    await expect(page.locator("#live-version")).not_to_have_text("the base model")
    start = page.locator("form.canary-start", has=page.locator(f'[data-version="{later}"]'))
    await start.locator("button").click()
    await expect(page.locator("#canary-split")).to_have_text("10%")
    await page.click("#canary-promote")
    await expect(page.locator(".notice")).to_contain_text("Canary promoted")
    versions = (await client.get("/v1/adapters", headers=a.auth("admin"))).json()["data"]
    assert [v["id"] for v in versions if v["live"]] == [later]
