"""``tuneloop demo``: the main job on the embedded defaults.

At this stage of the project it brings the API up on SQLite, creates a demo tenant through the
platform API, posts a batch of product feedback through HTTP (twice, to show that retries are
idempotent) and prints the tenant's feedback statistics. Later stages grow it into the whole loop.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import httpx
import uvicorn
from rich.console import Console
from rich.table import Table

from api.app import create_app
from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings
from tuneloop.runtime import ensure_schema

PROMPTS = [
    "How do I reset my password?",
    "Can I export my invoices as CSV?",
    "What does the Pro plan include?",
    "How do I add a teammate to my workspace?",
    "Why was my card declined?",
    "Where can I change the billing email?",
]
SHORT = "Open Settings, choose {topic}, and follow the two prompts."
LONG = (
    "Great question! There are a few things to know about {topic}. First, open the Settings "
    "page from the menu in the top right corner. Then look for the section called {topic}, "
    "where you will find every option together with a short explanation of what it does."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def sample_feedback(n: int, *, seed: int = 7) -> list[dict[str, Any]]:
    """Simulated thumbs from users who prefer short answers (~80% agreement)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        prompt = rng.choice(PROMPTS)
        long = rng.random() < 0.5
        topic = prompt.split()[-1].rstrip("?")
        likes = (not long) if rng.random() < 0.8 else long
        items.append(
            {
                "prompt": prompt,
                "completion": (LONG if long else SHORT).format(topic=topic),
                "rating": "up" if likes else "down",
                "user_id": f"user-{rng.randrange(40)}",
                "idempotency_key": f"demo-{seed}-{i}",
            }
        )
    return items


async def _demo(settings: ApiSettings, console: Console) -> None:
    engine = create_engine(settings)
    await ensure_schema(engine, settings)
    async with create_sessionmaker(engine)() as session:
        operator = await create_key(session, tenant_id=None, role=KeyRole.platform, name="demo")
        await session.commit()

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, engine=engine), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            raise RuntimeError("the API did not start")
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    console.print(f"[bold]API up[/] at {base} (database: {settings.sqlalchemy_url})")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            slug = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
            r = await http.post(
                "/v1/tenants",
                json={"slug": slug, "name": "Demo Inc."},
                headers={"Authorization": f"Bearer {operator.secret}"},
            )
            r.raise_for_status()
            created = r.json()
            product = {"Authorization": f"Bearer {created['product_key']['key']}"}
            admin = {"Authorization": f"Bearer {created['admin_key']['key']}"}
            console.print(f"created tenant [bold]{slug}[/] ({created['tenant']['id']})")

            items = sample_feedback(400)
            started = time.perf_counter()
            r = await http.post("/v1/feedback", json={"items": items}, headers=product)
            r.raise_for_status()
            took = time.perf_counter() - started
            console.print(
                f"posted {len(items)} feedback items in one batch: "
                f"{r.json()['created']} stored in {took * 1000:.0f} ms"
            )
            r = await http.post("/v1/feedback", json={"items": items}, headers=product)
            r.raise_for_status()
            console.print(
                f"posted the same batch again (a client retry): {r.json()['created']} "
                f"stored, {r.json()['replayed']} recognised as already stored"
            )

            stats = (await http.get("/v1/feedback/stats", params={"days": 7}, headers=admin)).json()
    finally:
        server.should_exit = True
        await serving
        await engine.dispose()

    table = Table(title=f"feedback for {slug} (last 7 days)")
    for col in ("date", "total", "up", "down", "up-rate"):
        table.add_column(col, justify="right")
    for day in stats["days"]:
        rate = "-" if day["up_rate"] is None else f"{day['up_rate']:.0%}"
        table.add_row(day["date"], str(day["total"]), str(day["up"]), str(day["down"]), rate)
    console.print(table)
    console.print(f"total {stats['total']}, up-rate {stats['up_rate']:.0%}")
    console.print(
        "next: `tuneloop api` serves the API; keys come from `tuneloop tenants create SLUG`"
    )


def run_demo(settings: ApiSettings) -> None:
    asyncio.run(_demo(settings, Console(soft_wrap=True)))
