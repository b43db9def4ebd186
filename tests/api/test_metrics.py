"""``/metrics``: Prometheus text with per-route counters that name no tenant, key or id."""

from __future__ import annotations

import httpx

from tests.conftest import TenantKeys


async def test_metrics_count_requests_by_route_template(
    client: httpx.AsyncClient, tenant: TenantKeys
) -> None:
    before = await client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    item = {"prompt": "p", "completion": "c", "rating": "up"}
    assert (await client.post("/v1/feedback", headers=tenant.auth(), json=item)).status_code == 201
    run = await client.get("/v1/runs/run_does_not_exist", headers=tenant.auth("admin"))
    assert run.status_code == 404
    assert (await client.get("/no/such/path")).status_code == 404

    text = (await client.get("/metrics")).text
    feedback = 'tuneloop_http_requests_total{method="POST",route="/v1/feedback",status="201"}'
    assert feedback in text
    assert _value(text, feedback) == _value(before.text, feedback) + 1
    # Deltas: the session's client has served other tests' requests on these series too.
    for series in (
        'tuneloop_http_requests_total{method="GET",route="/v1/runs/{run_id}",status="404"}',
        'tuneloop_http_requests_total{method="GET",route="unmatched",status="404"}',
    ):
        assert _value(text, series) == _value(before.text, series) + 1, series
    assert "tuneloop_http_request_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text
    # Nothing that identifies a caller or an object.
    for secret in (tenant.id, tenant.product, tenant.admin, "run_does_not_exist", "/no/such"):
        assert secret not in text


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
