"""Feedback ingestion benchmark: a live ``tuneloop api`` on PostgreSQL, load from loopback.

Measures single-item POSTs and 1,000-item batches (throughput, p50/p99 latency), then checks that
the database holds exactly the acknowledged rows. Bounded in requests and time; stops by itself.

    .venv/bin/python tests/bench/ingest.py [--seconds 15] [--concurrency 32] [--workers 2]

Targets on 2 cores: single items >= 1,000/s at p99 <= 50 ms; batched >= 20,000 items/s.
Writes JSON to tests/bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
from sqlalchemy import func, select, text

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from core.db import create_engine, create_sessionmaker  # noqa: E402
from core.models import Feedback  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tenants import create_tenant  # noqa: E402
from tests.bench.http_load import Client  # noqa: E402

SERVER = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/test"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def admin(sql: str) -> None:
    engine = create_engine(Settings(database_url=SERVER), isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(text(sql))
    await engine.dispose()


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the API processes and by all PostgreSQL processes."""
    api = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            api += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    pg = 0.0
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            try:
                t = p.cpu_times()
                pg += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return {"api": api, "postgres": pg, "bench_client": time.process_time()}


async def phase(
    port: int, key: str, *, batch: int, seconds: float, concurrency: int, pids: list[int]
) -> dict:
    """Closed loop: ``concurrency`` clients each send one request after the other."""
    latencies: list[float] = []
    acked = 0
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    run_tag = secrets.token_hex(3)

    async def worker(n: int) -> None:
        nonlocal acked
        client = Client("127.0.0.1", port)
        i = 0
        try:
            while time.perf_counter() < deadline:
                i += 1
                item = {
                    "prompt": f"q{n}-{i}",
                    "completion": "a" * 200,
                    "rating": "up",
                    "user_id": f"u{n}",
                    "idempotency_key": f"{run_tag}-{n}-{i}",
                }
                if batch == 1:
                    body = item
                else:
                    body = {
                        "items": [
                            {
                                **item,
                                "idempotency_key": f"{run_tag}-{n}-{i}-{j}",
                                "prompt": f"q{n}-{i}-{j}",
                            }
                            for j in range(batch)
                        ]
                    }
                t0 = time.perf_counter()
                try:
                    status = await client.post_json("/v1/feedback", body, key)
                except OSError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await client.close()
                    client = Client("127.0.0.1", port)
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if status in (200, 201):
                    acked += batch
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            await client.close()

    t0 = time.perf_counter()
    cpu0 = cpu_seconds(pids)
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(pids)
    per_request = {
        f"{k}_cpu_ms_per_request": round((cpu1[k] - cpu0[k]) * 1000 / max(1, len(latencies)), 3)
        for k in cpu0
    }
    return {
        **per_request,
        "batch": batch,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "items_acked": acked,
        "items_per_s": round(acked / elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(latencies, 0.50), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
        "errors": errors,
    }


async def main(args: argparse.Namespace) -> dict:
    name = f"tuneloop_bench_{secrets.token_hex(4)}"
    await admin(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(SERVER)._replace(path=f"/{name}"))
    settings = Settings(database_url=url)
    engine = create_engine(settings)
    proc = None
    try:
        await migrations.upgrade(engine)
        async with create_sessionmaker(engine)() as s:
            tenant = await create_tenant(s, slug="bench")
        key = tenant.product_key.secret

        port = 18000 + secrets.randbelow(2000)
        env = {**os.environ, "DATABASE_URL": url, "TUNELOOP_DATA_DIR": str(ROOT / ".tuneloop")}
        env["TUNELOOP_RATE_LIMIT_RPS"] = "0"  # the API's own throughput, not the per-key limit
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "tuneloop"),
                "api",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                c = Client("127.0.0.1", port)
                if await c.get("/readyz") == 200:
                    await c.close()
                    break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise SystemExit("API did not come up")
        api = psutil.Process(proc.pid)
        pids = [proc.pid] + [c.pid for c in api.children(recursive=True)]

        # Warm-up (connection pools, JIT-less but cache-warm code paths); not counted.
        await phase(port, key, batch=1, seconds=2, concurrency=args.concurrency, pids=pids)
        async with create_sessionmaker(engine)() as s:
            before = await s.scalar(select(func.count()).select_from(Feedback))
        single = await phase(
            port, key, batch=1, seconds=args.seconds, concurrency=args.concurrency, pids=pids
        )
        batched = await phase(
            port,
            key,
            batch=1000,
            seconds=args.seconds,
            concurrency=args.batch_concurrency,
            pids=pids,
        )
        async with create_sessionmaker(engine)() as s:
            after = await s.scalar(select(func.count()).select_from(Feedback))
        stored = (after or 0) - (before or 0)
        acked = single["items_acked"] + batched["items_acked"]
        return {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "api_workers": args.workers,
            "single": single,
            "batched": batched,
            "db_rows_stored": stored,
            "items_acknowledged": acked,
            "exact": stored == acked,
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        await engine.dispose()
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def report(result: dict) -> None:
    print(f"\nfeedback ingest, {result['api_workers']} API worker(s), PostgreSQL, loopback")
    head = f"{'mode':<9}{'conc':>5}{'requests':>9}{'items/s':>9}"
    head += f"{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}"
    print(head + "   CPU ms/request:   api     pg client")
    for mode in ("single", "batched"):
        r = result[mode]
        print(
            f"{mode:<9}{r['concurrency']:>5}{r['requests']:>9}{r['items_per_s']:>9.0f}"
            f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{sum(r['errors'].values()):>7}{'':>18}"
            f"{r['api_cpu_ms_per_request']:>6.2f}{r['postgres_cpu_ms_per_request']:>7.2f}"
            f"{r['bench_client_cpu_ms_per_request']:>7.2f}"
        )
    print(
        f"acknowledged {result['items_acknowledged']} items, database holds "
        f"{result['db_rows_stored']} new rows: {'EXACT' if result['exact'] else 'MISMATCH'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "tests/bench/results/ingest.json")
    result = asyncio.run(main(parser.parse_args()))
    report(result)
    out = parser.parse_args().out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    sys.exit(0 if result["exact"] else 1)
