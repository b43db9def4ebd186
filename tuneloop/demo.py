"""``tuneloop demo``: the whole loop on the embedded stack, through the public API.

Two tenants share the base model (SmolLM2-135M-Instruct by default). Their simulated users like
different things: ``concise`` likes answers under 40 words, ``detailed`` over 80. For each tenant
the demo sends real traffic to ``/v1/chat/completions``, posts the users' thumbs to
``/v1/feedback``, starts a personalization run (Temporal: compile → train → evaluate → gate →
promote), and finally asks held-out questions again, before vs after, judged by the same users.

SmolLM2 answers in about 60 words whatever the system prompt says, so to give the users real
choices half the sampled answers are drawn with a hint appended ("Answer in one short sentence."
for the concise tenant, "Explain in detail, step by step." for the detailed one, as their users
would ask); those thumbs are recorded against the plain question (inline feedback), the others
by interaction id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings
from trainer.simulated_users import DEMO_PROMPTS, PERSONAS
from tuneloop.runtime import ensure_schema
from tuneloop.stack import embedded_stack, free_port

TENANTS = ("concise", "detailed")
HINTS = {
    "concise": " Answer in one short sentence.",
    "detailed": " Explain in detail, step by step.",
}
TRAIN_PROMPTS = list(DEMO_PROMPTS[:10])
HELD_OUT = list(DEMO_PROMPTS[-6:])
POLICY = {"min_feedback": 16, "max_steps": 8, "rank": 8, "epochs": 1}
FINISHED = ("succeeded", "failed", "cancelled", "skipped")
MAX_TOKENS = 160  # room for the "detailed" users' 80+ words


async def _operator_key(settings: ApiSettings) -> str:
    engine = create_engine(settings)
    try:
        await ensure_schema(engine, settings)
        async with create_sessionmaker(engine)() as session:
            issued = await create_key(session, tenant_id=None, role=KeyRole.platform, name="demo")
            await session.commit()
    finally:
        await engine.dispose()
    return issued.secret


async def _chat(
    http: httpx.AsyncClient, key: str, question: str, *, n: int, temperature: float
) -> dict[str, Any]:
    r = await http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "default",
            "messages": [{"role": "user", "content": question}],
            "n": n,
            "temperature": temperature,
            "max_tokens": 96,
        },
    )
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


async def _traffic_and_thumbs(
    http: httpx.AsyncClient, tenant: str, keys: dict[str, str], console: Console
) -> dict[str, int]:
    persona = PERSONAS[tenant]
    asks = [(q, q + hint) for q in TRAIN_PROMPTS for hint in ("", HINTS[tenant])]
    answers = await asyncio.gather(
        *(_chat(http, keys["product"], asked, n=2, temperature=0.8) for _, asked in asks)
    )
    items: list[dict[str, Any]] = []
    for (question, asked), answer in zip(asks, answers, strict=True):
        for choice in answer["choices"]:
            rating = persona.rate(choice["message"]["content"])
            if asked == question:  # rate the served answer by its interaction id
                items.append({"interaction_id": choice["interaction_id"], "rating": rating})
            else:
                items.append(
                    {
                        "prompt": question,
                        "completion": choice["message"]["content"],
                        "rating": rating,
                        "metadata": {"sampled_with_hint": True},
                    }
                )
            items[-1]["user_id"] = f"{tenant}-user-{len(items) % 7}"
    r = await http.post(
        "/v1/feedback",
        headers={"Authorization": f"Bearer {keys['product']}"},
        json={"items": items},
    )
    r.raise_for_status()
    ups = sum(1 for i in items if i["rating"] > 0)
    console.print(
        f"  {tenant}: {len(answers) * 2} answers served, {len(items)} thumbs "
        f"({ups} up, {len(items) - ups} down)"
    )
    return {"thumbs": len(items), "up": ups}


async def _judge_share(http: httpx.AsyncClient, tenant: str, key: str) -> tuple[float, list[str]]:
    persona = PERSONAS[tenant]
    answers = await asyncio.gather(*(_chat(http, key, q, n=1, temperature=0) for q in HELD_OUT))
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    return sum(persona.likes(t) for t in texts) / len(texts), texts


async def _follow(
    http: httpx.AsyncClient, runs: dict[str, tuple[str, dict[str, str]]], console: Console
) -> dict[str, dict[str, Any]]:
    """Poll every run, printing stage changes and training progress, until all finish."""
    last: dict[str, str] = {}
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(runs):
        for tenant, (run_id, keys) in runs.items():
            if tenant in done:
                continue
            run = (
                await http.get(
                    f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {keys['admin']}"}
                )
            ).json()
            p = run.get("progress") or {}
            line = run["status"]
            if p.get("step"):
                line += f", step {p['step']}/{p.get('total_steps')}"
                if p.get("loss") is not None:
                    line += f", loss {p['loss']:.3f}"
            if line != last.get(tenant):
                console.print(f"  {tenant}: {line}")
                last[tenant] = line
            if run["status"] in FINISHED:
                done[tenant] = run
        await asyncio.sleep(2)
    return done


async def _demo(settings: ApiSettings, console: Console) -> None:
    started = time.monotonic()
    operator = await _operator_key(settings)
    settings = settings.model_copy(update={"port": free_port()})
    async with embedded_stack(settings, temporal_port=free_port(), ui_port=free_port()) as stack:
        console.print(
            f"[bold]tuneloop is up[/]: API {stack.api_url}, Temporal "
            f"{stack.temporal_address}, base model {settings.base_model}"
        )
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=600) as http:
            keys: dict[str, dict[str, str]] = {}
            stamp = time.strftime("%H%M%S")
            for tenant in TENANTS:
                r = await http.post(
                    "/v1/tenants",
                    headers={"Authorization": f"Bearer {operator}"},
                    json={"slug": f"{tenant}-{stamp}", "name": f"{tenant} users"},
                )
                r.raise_for_status()
                body = r.json()
                keys[tenant] = {
                    "admin": body["admin_key"]["key"],
                    "product": body["product_key"]["key"],
                }
                r = await http.put(
                    "/v1/policy",
                    json=POLICY,
                    headers={"Authorization": f"Bearer {keys[tenant]['admin']}"},
                )
                r.raise_for_status()

            console.print(
                f"Dashboard: {stack.api_url}/dashboard (while the demo runs), log in with a "
                "tenant's admin key:"
            )
            for tenant in TENANTS:
                console.print(f"  {tenant}: {keys[tenant]['admin']}")
            console.print("[bold]1. before[/]: held-out questions answered by the base model")
            before = {t: await _judge_share(http, t, keys[t]["product"]) for t in TENANTS}
            console.print(
                "[bold]2. traffic and thumbs[/] through /v1/chat/completions and /v1/feedback"
            )
            for tenant in TENANTS:
                await _traffic_and_thumbs(http, tenant, keys[tenant], console)
            console.print(
                "[bold]3. personalization runs[/] (compile → train → evaluate → gate → promote)"
            )
            runs = {}
            for tenant in TENANTS:
                r = await http.post(
                    "/v1/runs",
                    json={},
                    headers={"Authorization": f"Bearer {keys[tenant]['admin']}"},
                )
                r.raise_for_status()
                runs[tenant] = (r.json()["id"], keys[tenant])
            finished = await _follow(http, runs, console)
            console.print("[bold]4. after[/]: the same held-out questions, now served by `default`")
            after = {t: await _judge_share(http, t, keys[t]["product"]) for t in TENANTS}
            cross = {}
            for tenant, other in zip(TENANTS, reversed(TENANTS), strict=True):
                version = finished[other].get("adapter_version_id")
                if version and finished[other]["reason"].startswith("promoted"):
                    # Ask the other tenant's key: the only way to use its adapter.
                    share, _ = await _judge_share(http, tenant, keys[other]["product"])
                    cross[tenant] = share

        table = Table(title="share of held-out answers each tenant's users like")
        for col in ("tenant", "base model", "own adapter", "other tenant's adapter", "run"):
            table.add_column(col)
        for tenant in TENANTS:
            run = finished[tenant]
            table.add_row(
                tenant,
                f"{before[tenant][0]:.0%}",
                f"{after[tenant][0]:.0%}",
                f"{cross[tenant]:.0%}" if tenant in cross else "-",
                f"{run['status']}: {run['reason']}",
            )
        console.print(table)
        for tenant in TENANTS:
            console.print(f"[dim]{tenant}, after: {after[tenant][1][0][:160]!r}[/]")
        console.print(
            f"Dashboard: {stack.api_url}/dashboard   API docs: {stack.api_url}/docs   "
            f"Temporal UI: {stack.temporal_ui}"
        )
        console.print(
            f"finished in {time.monotonic() - started:.0f} s (the stack stops now; "
            "`tuneloop up` keeps it running)"
        )


def run_demo(settings: ApiSettings) -> None:
    # A skipped run's activity failure is an expected outcome here, not news: keep Temporal's
    # tracebacks for real errors only.
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    # One line per HTTP call (hundreds of them) would bury the demo's own story.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The demo prints its own progress; the libraries' bars would bury it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    asyncio.run(_demo(settings, Console(soft_wrap=True)))
