"""The operator's command line and a live ``tuneloop api`` over real HTTP."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TUNELOOP, Backend, free_port, tuneloop_env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TUNELOOP, *args], env=env, capture_output=True, text=True, timeout=120)


def test_tenant_and_key_commands(tmp_path: Path, backend: Backend) -> None:
    env = tuneloop_env(tmp_path, backend.url)
    assert run(["db", "upgrade"], env).returncode == 0
    r = run(
        [
            "tenants",
            "create",
            "cli-" + tmp_path.name[-8:].lower().replace("_", "-"),
            "--name",
            "CLI Co",
        ],
        env,
    )
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    slug = made["tenant"]["slug"]
    assert made["tenant"]["name"] == "CLI Co"
    assert made["admin_key"]["key"].startswith("tl_a") and made["product_key"]["key"].startswith(
        "tl_k"
    )

    r = run(["keys", "create", "--tenant", slug, "--role", "product"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["role"] == "product"
    r = run(["keys", "create", "--platform"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["key"].startswith("tl_p")

    for args, hint in (
        (["keys", "create", "--tenant", "no-such-tenant", "--role", "admin"], "no tenant"),
        (["keys", "create", "--tenant", slug, "--role", "owner"], "--role"),
        (["keys", "create"], "--platform"),
        (["tenants", "create", slug], "already exists"),
        (["tenants", "create", "Bad Slug"], "slug"),
    ):
        r = run(args, env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert hint in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_configured_database_must_be_migrated(tmp_path: Path) -> None:
    env = tuneloop_env(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    r = run(["tenants", "create", "x"], env)
    assert r.returncode == 2 and "tuneloop db upgrade" in r.stderr
    r = run(["tenants", "create", "x"], tuneloop_env(tmp_path, "mysql://nope"))
    assert r.returncode == 2 and "DATABASE_URL" in r.stderr


def test_the_example_session_secret_is_refused(tmp_path: Path) -> None:
    # infra/.env.example's placeholder, copied unchanged, would let anyone forge sessions.
    env = tuneloop_env(tmp_path)
    placeholder = (Path(__file__).parents[2] / "infra/.env.example").read_text()
    assert "TUNELOOP_SESSION_SECRET=change-me" in placeholder
    for weak in ("change-me-to-64-random-characters", "short"):
        r = run(["api"], {**env, "TUNELOOP_SESSION_SECRET": weak})
        assert r.returncode != 0 and "TUNELOOP_SESSION_SECRET" in r.stderr, r.stderr
        assert weak not in r.stderr  # a secret is never echoed


def test_live_api_over_http(tmp_path: Path, backend: Backend) -> None:
    env = tuneloop_env(tmp_path, backend.url)
    made = json.loads(
        run(
            ["tenants", "create", "live-" + tmp_path.name[-6:].lower().replace("_", "-")], env
        ).stdout
    )
    port = free_port()
    # To a file, not a pipe nobody reads: a full pipe would stall the server mid-test.
    log = tmp_path / "api.log"
    proc = subprocess.Popen(
        [TUNELOOP, "api", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        # Generous: importing the ML stack takes a while on a loaded 2-core machine.
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"api did not come up: {log.read_text()}")
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {made['product_key']['key']}"}
        r = httpx.post(
            f"{base}/v1/feedback",
            headers=auth,
            json={"prompt": "p", "completion": "c", "rating": "up", "idempotency_key": "live-1"},
        )
        assert r.status_code == 201
        again = httpx.post(
            f"{base}/v1/feedback",
            headers=auth,
            json={"prompt": "p", "completion": "c", "rating": "up", "idempotency_key": "live-1"},
        )
        assert again.status_code == 200 and again.json()["id"] == r.json()["id"]
        r = httpx.get(
            f"{base}/v1/feedback/stats",
            headers={"Authorization": f"Bearer {made['admin_key']['key']}"},
        )
        assert r.json()["total"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
