"""Personalization benchmark: does the loop learn from feedback shaped like a real product's logs,
and does its default gate refuse what is not better?

Everything goes through the product's own path: the embedded stack (Temporal dev server, API,
one worker on both queues, the local serving tier) on the real base model (SmolLM2-135M-Instruct
by default). For each simulated tenant (:mod:`tuneloop.simulation`):

1. its users ask distinct questions from the project's pool, once each, through
   ``/v1/chat/completions``; half the answers get a thumb through ``/v1/feedback``, one rating in
   ten is flipped, five users per tenant with thresholds of their own, relevance judged;
2. a personalization run with the **default policy** (nothing is set: the gate, the judge bar
   and the capability guard are the product's defaults);
3. held-out questions (never asked) answered by the base model, by the base model with 8 of the
   tenant's liked answers in the prompt ("few-shot") and by the run's adapter, judged by the
   tenant's users with relevance.

Personas are ``plain``, ``prose`` and ``bullets`` by default (``concise`` measures words, and
nearly every SmolLM2 answer runs into the 96-token cap, so its users judge cut-off lengths);
``noise`` tenants vote by coin flip, one per seed (``--noise-seeds`` of them from
``--noise-first-seed``), and must never be promoted.
Prints the table and writes JSON to ``tests/bench/results/``. Run on purpose, not in the suite::

    .venv/bin/python -m tests.bench.personalization                      # the full run
    .venv/bin/python -m tests.bench.personalization --personas plain --noise-seeds 1
    .venv/bin/python -m tests.bench.personalization --methods kto,grpo --noise-seeds 0

``--judge-bar`` lowers the judge's bar for the persona tenants only (not the policy's
default: say so wherever its numbers go). ``--methods`` trains each persona once per method
(each on a tenant of its own, served the same questions with the same seed) and adds a table of
liked share, capability, win rate, training CPU and wall seconds, evaluation seconds and metered
tokens per method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from core.settings import ApiSettings
from trainer.simulated_users import PERSONAS
from tuneloop.demo import METHODS, _operator_key
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

RESULTS = Path(__file__).parent / "results"


async def _tenant(http: httpx.AsyncClient, operator: str, slug: str) -> dict[str, str]:
    r = await http.post(
        "/v1/tenants", headers={"Authorization": f"Bearer {operator}"}, json={"slug": slug}
    )
    r.raise_for_status()
    body = r.json()
    return {"admin": body["admin_key"]["key"], "product": body["product_key"]["key"]}


async def _timings(http: httpx.AsyncClient, admin: str, run_id: str) -> dict[str, Any]:
    """From the run's own "trained" event: the method that ran and why, training wall and CPU
    seconds, and the tokens metered (GRPO: prompt and completion tokens of its groups plus what
    its judge read; DPO/KTO: the rows trained on)."""
    auth = {"Authorization": f"Bearer {admin}"}
    events = (await http.get(f"/v1/runs/{run_id}/events", headers=auth)).json()["data"]
    out: dict[str, Any] = {}
    for e in events:
        if e["message"].startswith("trained "):
            data = e.get("data") or {}
            out["train_s"] = float(data.get("runtime_s") or 0.0)
            out["cpu_s"] = float(data.get("cpu_s") or 0.0)
            out["tokens"] = int(data.get("tokens") or 0)
            out["method"] = data.get("method")
            out["method_reason"] = data.get("method_reason")
    return out


def methods_table(rows: list[TenantResult], extra: dict[str, dict[str, Any]]) -> Table:
    """The GRPO issue's table: one row per persona and method."""
    table = Table(title="methods side by side (same traffic, same held-out questions)")
    for col in (
        "tenant",
        "method (ran)",
        "liked base → cand. (paired lift)",
        "capability base → cand.",
        "win rate [95 % CI]",
        "train CPU s",
        "train wall s",
        "eval wall s",
        "tokens",
        "decision",
    ):
        table.add_column(col)
    for r in rows:
        t = extra.get(r.name, {})
        base, cand = r.liked.get("base"), r.liked.get("adapter")
        liked = f"{base.value:.0%} → {cand.value:.0%}" if base and cand else "-"
        if r.lift is not None:
            pts = [round(100 * x) for x in (r.lift.value, r.lift.low, r.lift.high)]
            liked += f" ({pts[0]:+d} pts [{pts[1]:+d}, {pts[2]:+d}], n={r.lift.n})"
        cap = r.report.get("capability_base"), r.report.get("capability_candidate")
        win = (r.report.get("ci") or {}).get("win_rate")
        table.add_row(
            r.name,
            f"{r.method} ({t.get('method') or '-'})",
            liked,
            f"{cap[0]:.0%} → {cap[1]:.0%}" if None not in cap else "-",
            f"{win['value']:.2f} [{win['low']:.2f}, {win['high']:.2f}]" if win else "-",
            f"{t.get('cpu_s', 0):.0f}",
            f"{t.get('train_s', 0):.0f}",
            f"{t.get('eval_s', 0):.0f}",
            str(t.get("tokens", "-")),
            "promoted" if r.promoted else "not promoted",
        )
    return table


async def bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    settings = ApiSettings(base_model=args.base, data_dir=Path(args.data_dir))
    operator = await _operator_key(settings)
    settings = settings.model_copy(update={"port": free_port()})
    # One tenant per persona and method, all served the same questions with the same seed.
    named = args.methods != ["auto"]
    tenants = [(f"{p}-{m}" if named else p, p, 0) for p in args.personas for m in args.methods] + [
        (f"noise-{s}", "noise", s)
        for s in range(args.noise_first_seed, args.noise_first_seed + args.noise_seeds)
    ]
    method_of = {(f"{p}-{m}" if named else p): m for p in args.personas for m in args.methods}
    traffic, held_out = split_questions(args.traffic, args.held_out, seed=args.seed)
    results = {
        name: TenantResult(name=name, persona=persona, method=method_of.get(name, "auto"))
        for name, persona, _ in tenants
    }
    extra: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    async with (
        embedded_stack(settings, temporal_port=free_port(), ui_port=free_port()) as stack,
        httpx.AsyncClient(base_url=stack.api_url, timeout=3600) as http,
    ):
        stamp = time.strftime("%H%M%S")
        keys = {n: await _tenant(http, operator, f"{n}-{stamp}") for n, _, _ in tenants}
        if args.judge_bar is not None:  # persona tenants only: the noise tenants keep the default
            for name, persona, _ in tenants:
                if persona != "noise":
                    put = await http.put(
                        "/v1/policy",
                        headers={"Authorization": f"Bearer {keys[name]['admin']}"},
                        json={"min_judge_auroc": args.judge_bar},
                    )
                    put.raise_for_status()
        console.print(f"traffic: {len(traffic)} questions per tenant, {len(tenants)} tenants")
        liked = dict(
            zip(
                [n for n, _, _ in tenants],
                await asyncio.gather(
                    *(
                        serve_and_rate(
                            http,
                            keys[n],
                            PERSONAS[p],
                            traffic,
                            result=results[n],
                            seed=args.seed * 1000 + s,
                            max_tokens=args.max_tokens,
                        )
                        for n, p, s in tenants
                    )
                ),
                strict=True,
            )
        )
        console.print(f"traffic done at {time.monotonic() - started:.0f} s")

        async def personalize(name: str) -> None:
            t0 = time.monotonic()
            run = await run_and_wait(
                http,
                keys[name]["admin"],
                poll_s=10,
                say=lambda s: console.print(f"{name}: {s}"),
                method=None if results[name].method == "auto" else results[name].method,
            )
            results[name].run, results[name].run_s = run, time.monotonic() - t0
            if run.get("adapter_version_id"):
                results[name].report = await eval_report(
                    http, keys[name]["admin"], run["adapter_version_id"]
                )
            extra[name] = await _timings(http, keys[name]["admin"], run["id"])
            extra[name]["eval_s"] = float(results[name].report.get("duration_s") or 0.0)

        # One worker runs one training or evaluation at a time: tenants queue, as in production.
        await asyncio.gather(*(personalize(n) for n, _, _ in tenants))
        base_answers = None
        for name, persona, _ in tenants:
            if persona == "noise":
                continue  # a coin has no taste to measure
            base_answers = await held_out_liked(
                http,
                keys[name],
                PERSONAS[persona],
                held_out,
                liked[name],
                result=results[name],
                max_tokens=args.max_tokens,
                base_answers=base_answers,
            )
    rows = [results[n] for n, _, _ in tenants]
    console.print(results_table(rows, f"personalization on {args.base}, default policy"))
    if named:
        console.print(methods_table([r for r in rows if r.persona != "noise"], extra))
    for r in rows:
        t = extra.get(r.name, {})
        console.print(
            f"{r.name}: train {t.get('train_s', 0):.0f} s + eval {t.get('eval_s', 0):.0f} s; "
            f"{r.run.get('reason')}"
        )
    return {
        "benchmark": "personalization",
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args),
        "wall_s": round(time.monotonic() - started, 1),
        "tenants": [{**r.to_dict(), **extra.get(r.name, {})} for r in rows],
        "noise_promoted": sum(r.promoted for r in rows if r.persona == "noise"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument(
        "--personas",
        type=lambda s: [p for p in s.split(",") if p],
        default="plain,prose,bullets",
        help="comma-separated; empty for noise tenants only",
    )
    parser.add_argument("--noise-seeds", type=int, default=5, help="how many noise tenants")
    parser.add_argument(
        "--noise-first-seed",
        type=int,
        default=0,
        help="the first noise tenant's seed (split the seeds across runs: 0 then 3, ...)",
    )
    parser.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=["auto"],
        help="training methods, each on its own tenant per persona (e.g. dpo,kto,grpo)",
    )
    parser.add_argument(
        "--judge-bar",
        type=float,
        default=None,
        help="min_judge_auroc for the persona tenants (default: the policy's 0.65); a lower bar "
        "lets GRPO run on a weaker judge, and lets that judge decide the win rate",
    )
    parser.add_argument("--traffic", type=int, default=240, help="questions per tenant")
    parser.add_argument("--held-out", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=".tuneloop-bench")
    args = parser.parse_args()
    if isinstance(args.personas, str):
        args.personas = [p for p in args.personas.split(",") if p]
    for m in args.methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    for p in args.personas:
        if p not in PERSONAS or p == "noise":
            sys.exit(
                f"unknown persona {p!r}; known: {', '.join(k for k in PERSONAS if k != 'noise')}"
            )
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    result = asyncio.run(bench(args, console))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"personalization-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
