"""The operator's billing commands, as a subprocess against the fake Stripe."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

from tests.billing.fake_stripe import FakeStripe
from tests.conftest import TUNELOOP, Backend, tuneloop_env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TUNELOOP, *args], env=env, capture_output=True, text=True, timeout=120)


def stripe_env(tmp_path: Path, backend: Backend, fake: FakeStripe) -> dict[str, str]:
    env = tuneloop_env(tmp_path, backend.url or f"sqlite:///{tmp_path / 'cli.db'}")
    env |= {
        "STRIPE_API_KEY": fake.api_key,
        "STRIPE_API_BASE": fake.url,
        "STRIPE_METER_EVENTS_BASE": fake.url,
    }
    return env


def test_billing_setup_and_tenants_create_use_stripe(
    tmp_path: Path, backend: Backend, fake_stripe: FakeStripe
) -> None:
    env = stripe_env(tmp_path, backend, fake_stripe)
    assert run(["db", "upgrade"], env).returncode == 0

    # Stripe down while the tenant is created: the tenant exists anyway, without a customer.
    fake_stripe.fail_customers = 1
    r = run(["tenants", "create", f"cli-{secrets.token_hex(4)}"], env)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)["tenant"]
    assert made["stripe_customer_id"] is None

    r = run(["billing", "setup"], env)
    assert r.returncode == 0, r.stderr
    setup = json.loads(r.stdout)
    assert set(setup["meters"]) == set(setup["prices"]) == {"inference_tokens", "training_tokens"}
    assert all(p in fake_stripe.prices for p in setup["prices"].values())
    assert setup["tenants_failed"] == []
    customers = [
        c for c in fake_stripe.customers.values() if c["metadata"]["tenant_id"] == made["id"]
    ]
    assert len(customers) == 1  # setup made the customer the creation could not
    meters = len(fake_stripe.meters)
    again = run(["billing", "setup"], env)  # safe to repeat
    assert again.returncode == 0 and json.loads(again.stdout)["prices"] == setup["prices"]
    assert len(fake_stripe.meters) == meters

    r = run(["tenants", "create", f"cli-{secrets.token_hex(4)}"], env)
    assert json.loads(r.stdout)["tenant"]["stripe_customer_id"] in fake_stripe.customers


def test_billing_setup_needs_a_key(tmp_path: Path) -> None:
    r = run(["billing", "setup"], tuneloop_env(tmp_path))
    assert r.returncode == 2 and "STRIPE_API_KEY is not set" in r.stderr
