"""``tuneloop demo``: the whole loop on the embedded stack, through the public API, on traffic
shaped like a real product's.

Two tenants share the base model (SmolLM2-135M-Instruct by default). ``plain``'s users like plain
language (short sentences; five users with thresholds of their own, and every one also dislikes
an answer that does not address the question); ``noise``'s users vote by coin flip, the tenant a
gate must never promote for. For each tenant the demo asks distinct questions once each through
``/v1/chat/completions``; half the answers get a thumb through ``/v1/feedback`` (one in ten
flipped: users are not consistent). Then each tenant gets a personalization run with the default
policy (Temporal: compile → train → judge → evaluate → gate → promote), and held-out questions,
never asked before, are answered by the base model, by the base model with eight of the tenant's
liked answers in the prompt ("few-shot", what a tenant could do without us) and by the run's
adapter, judged by the same users.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import get_args

import httpx
from rich.console import Console

from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings
from trainer.simulated_users import PERSONAS, answers_question
from trainer.training import Method
from tuneloop.runtime import ensure_schema
from tuneloop.simulation import (
    TenantResult,
    eval_report,
    held_out_liked,
    results_table,
    run_and_wait,
    serve_and_rate,
    split_questions,
)
from tuneloop.stack import embedded_stack, free_port

TENANTS = ("plain", "noise")
"""One taste the gate should promote for and a coin-flip tenant it must refuse. Two tastes would
not fit in 15 minutes of two CPU cores: every tenant's evaluation generates a few hundred
answers (win rate, capability suite), and a coin's judge cannot decide, so its evaluation is
short."""
TRAFFIC = 120
"""Distinct questions each tenant's users ask (about half get a thumb)."""
HELD_OUT = 30
MAX_TOKENS = 96
METHODS: tuple[str, ...] = get_args(Method)
METHOD_ENV = "TUNELOOP_DEMO_METHOD"
"""The training method the demo's runs ask for (default: the policy's, ``auto``)."""


def demo_method() -> str:
    method = os.environ.get(METHOD_ENV, "auto").strip().lower() or "auto"
    if method not in METHODS:
        raise RuntimeError(f"{METHOD_ENV} must be one of {', '.join(METHODS)}, got {method!r}")
    return method


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


async def _demo(settings: ApiSettings, console: Console, method: str) -> None:
    started = time.monotonic()
    operator = await _operator_key(settings)
    settings = settings.model_copy(update={"port": free_port()})
    traffic, held_out = split_questions(TRAFFIC * len(TENANTS), HELD_OUT, seed=0)
    async with embedded_stack(settings, temporal_port=free_port(), ui_port=free_port()) as stack:
        console.print(
            f"[bold]tuneloop is up[/]: API {stack.api_url}, Temporal "
            f"{stack.temporal_address}, base model {settings.base_model}"
        )
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=900) as http:
            keys: dict[str, dict[str, str]] = {}
            results = {t: TenantResult(name=t, persona=t) for t in TENANTS}
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
            console.print(
                f"Dashboard: {stack.api_url}/dashboard (while the demo runs), log in with a "
                "tenant's admin key:"
            )
            for tenant in TENANTS:
                console.print(f"  {tenant}: {keys[tenant]['admin']}")

            console.print(
                f"[bold]1. traffic and thumbs[/]: {TRAFFIC} distinct questions per tenant, asked "
                "once each through /v1/chat/completions; half the answers rated through "
                "/v1/feedback, one rating in ten flipped"
            )
            liked = dict(
                zip(
                    TENANTS,
                    await asyncio.gather(
                        *(
                            serve_and_rate(
                                http,
                                keys[t],
                                PERSONAS[t],
                                traffic[i * TRAFFIC : (i + 1) * TRAFFIC],
                                result=results[t],
                                seed=i,
                                max_tokens=MAX_TOKENS,
                            )
                            for i, t in enumerate(TENANTS)
                        )
                    ),
                    strict=True,
                )
            )
            for t in TENANTS:
                r0 = results[t]
                console.print(f"  {t} ({PERSONAS[t].description}): {r0.thumbs} thumbs, {r0.ups} up")

            console.print(
                "[bold]2. personalization runs[/] with the default policy (compile → train → "
                "judge → evaluate → gate → promote), method "
                + (f"{method} ({METHOD_ENV})" if method != "auto" else "auto")
            )

            async def personalize(t: str) -> None:
                t0 = time.monotonic()
                run = await run_and_wait(
                    http,
                    keys[t]["admin"],
                    say=lambda line: console.print(f"  {t}: {line}"),
                    method=None if method == "auto" else method,
                )
                results[t].run, results[t].run_s = run, time.monotonic() - t0
                if run.get("adapter_version_id"):
                    results[t].report = await eval_report(
                        http, keys[t]["admin"], run["adapter_version_id"]
                    )

            await asyncio.gather(*(personalize(t) for t in TENANTS))
            for t in TENANTS:
                console.print(f"  {t}: {results[t].run['status']}: {results[t].run['reason']}")

            console.print(
                f"[bold]3. held-out[/]: {HELD_OUT} questions never asked before, answered by the "
                "base model, by the base model with 8 liked answers in the prompt, and by the "
                "run's adapter"
            )
            base_answers = None
            for t in TENANTS:
                if PERSONAS[t].liked_when == "coin":
                    continue  # a coin has no taste to measure
                base_answers = await held_out_liked(
                    http,
                    keys[t],
                    PERSONAS[t],
                    held_out,
                    liked[t],
                    result=results[t],
                    max_tokens=MAX_TOKENS,
                    base_answers=base_answers,
                )

        console.print(
            results_table(
                [results[t] for t in TENANTS],
                "each tenant's held-out questions, judged by its own users (with relevance)",
            )
        )
        for t in TENANTS:
            ex = results[t].example
            if ex:
                on_topic = answers_question(ex["question"], ex["adapter"])
                liked_it = PERSONAS[t].likes(ex["adapter"], ex["question"])
                console.print(
                    f"{t}, held out: {ex['question']!r}\n"
                    f"  base:    {ex['base'].strip()[:240]!r}\n"
                    f"  adapter: {ex['adapter'].strip()[:240]!r}\n"
                    f"  (answers the question: {'yes' if on_topic else 'no'}; "
                    f"{t} users like it: {'yes' if liked_it else 'no'})"
                )
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
    method = demo_method()  # before anything starts: a typo is refused at once
    # Wide enough for the results table when the output is a file or a pipe, not a terminal.
    asyncio.run(
        _demo(settings, Console(soft_wrap=True, width=None if sys.stdout.isatty() else 180), method)
    )
