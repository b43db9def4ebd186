"""What a running canary adds to resolving ``default`` (target: at most 1 ms per request).

Two tenants with the same two versions, one live, differ only in that one of them runs a canary
of the other version (fraction 0.5). Each call does what a request does to find its adapter:
a fresh session from the pool and ``serving.registry.resolve_model(model="default", user=...)``
with a new end user each time. Calls alternate between the two tenants, so drift on these shared
cores lands on both alike. Reported per database (SQLite file, and PostgreSQL when
``--postgres`` is given or ``DATABASE_URL`` names one): mean, p50 and p95 in ms, and the mean
difference with its 95 % interval. Prints a table and writes JSON to ``tests/bench/results/``::

    .venv/bin/python -m tests.bench.canary_resolve
    .venv/bin/python -m tests.bench.canary_resolve --calls 5000 --postgres postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import migrations
from core import deployments
from core.artifacts import ArtifactStore
from core.db import create_engine, create_sessionmaker
from core.models import AdapterVersion
from core.settings import ApiSettings
from core.tenants import create_tenant
from serving.registry import resolve_model

RESULTS = Path(__file__).parent / "results"


async def _tenant(session: Any, slug: str, canary: bool) -> str:
    tenant = (await create_tenant(session, slug=slug)).tenant
    versions = []
    for n in range(2):
        version = AdapterVersion(
            tenant_id=tenant.id,
            sha256=f"{n:064x}",
            serving_name=f"{slug}-{n}",
            uri=f"adapters/{slug}/{n}",
            base_model="tiny-random",
            rank=8,
        )
        session.add(version)
        versions.append(version)
    await session.commit()
    await deployments.promote(session, tenant_id=tenant.id, version_id=versions[0].id)
    if canary:
        await deployments.start_canary(
            session, tenant_id=tenant.id, version_id=versions[1].id, fraction=0.5
        )
    return str(tenant.id)


async def measure(database_url: str, data_dir: Path, calls: int) -> dict[str, Any]:
    settings = ApiSettings(data_dir=data_dir, database_url=database_url)
    engine = create_engine(settings)
    await migrations.upgrade(engine)
    sessionmaker = create_sessionmaker(engine)
    store = ArtifactStore(data_dir / "artifacts")
    stamp = time.strftime("%H%M%S")
    async with sessionmaker() as s:
        plain = await _tenant(s, f"resolve-plain-{stamp}", canary=False)
        with_canary = await _tenant(s, f"resolve-canary-{stamp}", canary=True)
    times: dict[str, list[float]] = {"no canary": [], "canary": []}
    arms: dict[str | None, int] = {}
    for i in range(calls * 2 + 200):
        label, tenant_id = ("canary", with_canary) if i % 2 else ("no canary", plain)
        t0 = time.perf_counter()
        async with sessionmaker() as s:
            resolved = await resolve_model(
                s, store, tenant_id=tenant_id, model="default", user=f"user-{i}"
            )
        elapsed = (time.perf_counter() - t0) * 1000
        if i >= 200:  # the first calls warm the pool and the caches
            times[label].append(elapsed)
            if label == "canary":
                arms[resolved.canary_arm] = arms.get(resolved.canary_arm, 0) + 1
    await engine.dispose()
    a, b = times["no canary"], times["canary"]
    diff = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return {
        "calls_each": calls,
        **{
            label: {
                "mean_ms": round(statistics.fmean(t), 4),
                "p50_ms": round(statistics.median(t), 4),
                "p95_ms": round(statistics.quantiles(t, n=20)[-1], 4),
            }
            for label, t in times.items()
        },
        "added_mean_ms": round(diff, 4),
        "added_mean_ci95_ms": [round(diff - 1.96 * se, 4), round(diff + 1.96 * se, 4)],
        "canary_arms_seen": arms,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="resolutions per tenant")
    parser.add_argument("--postgres", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-resolve-") as tmp:
        databases = {"sqlite": f"sqlite:///{tmp}/resolve.db"}
        if args.postgres and args.postgres.startswith("postgres"):
            databases["postgresql"] = args.postgres
        for name, url in databases.items():
            results[name] = await measure(url, Path(tmp), args.calls)
    table = Table(title=f"resolving 'default', {args.calls} calls each, alternating tenants")
    for col in ("database", "no canary: mean / p50 / p95 ms", "canary: mean / p50 / p95 ms"):
        table.add_column(col)
    table.add_column("added by the canary, mean [95 % CI] ms (target <= 1)")
    for name, r in results.items():
        row = [name]
        for label in ("no canary", "canary"):
            t = r[label]
            row.append(f"{t['mean_ms']:.3f} / {t['p50_ms']:.3f} / {t['p95_ms']:.3f}")
        low, high = r["added_mean_ci95_ms"]
        row.append(f"{r['added_mean_ms']:+.3f} [{low:+.3f}, {high:+.3f}]")
        table.add_row(*row)
    console.print(table)
    out = {
        "benchmark": "canary_resolve",
        "when": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg": os.getloadavg(),
        },
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"canary-resolve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
