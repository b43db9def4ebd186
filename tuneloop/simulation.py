"""A simulated tenant driven through the public API, shared by ``tuneloop demo`` and the
personalization benchmark: realistic traffic (every question asked once, one answer each), its
users' sparse and noisy thumbs, and the held-out comparison a tenant admin cares about (base,
base with a few liked answers in the prompt, the adapter), judged by the same simulated users.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.table import Table

from trainer.simulated_users import Persona, question_pool, simulate_thumbs
from trainer.stats import Estimate, paired_difference, proportion

FINISHED = ("succeeded", "failed", "cancelled", "skipped")
FEW_SHOT = 8
"""Liked answers put in the prompt for the "few-shot" column: what a tenant could do without us."""


def split_questions(
    n_traffic: int, n_held_out: int, *, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Disjoint traffic and held-out questions from the pool, shuffled by ``seed``."""
    pool = [q.text for q in question_pool()]
    if n_traffic + n_held_out > len(pool):
        raise ValueError(f"the pool holds {len(pool)} questions; asked for more")
    random.Random(seed).shuffle(pool)
    return pool[:n_traffic], pool[n_traffic : n_traffic + n_held_out]


@dataclass
class TenantResult:
    """What one simulated tenant went through, for the table and the JSON."""

    name: str
    persona: str
    method: str = "auto"
    """The method the run was asked for (the run's log says which ran)."""
    slug: str = ""
    thumbs: int = 0
    ups: int = 0
    run: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    liked: dict[str, Estimate] = field(default_factory=dict)
    """Held-out liked share by column: ``base``, ``few-shot``, ``adapter``."""
    lift: Estimate | None = None
    """Adapter minus base liked share, paired over the same held-out questions."""
    example: dict[str, str] = field(default_factory=dict)
    run_s: float = 0.0

    @property
    def promoted(self) -> bool:
        return str(self.run.get("reason") or "").startswith("promoted")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "persona": self.persona,
            "method": self.method,
            "thumbs": self.thumbs,
            "up_share": self.ups / self.thumbs if self.thumbs else None,
            "promoted": self.promoted,
            "run": {k: self.run.get(k) for k in ("id", "status", "reason", "adapter_version_id")},
            "run_s": round(self.run_s, 1),
            "liked": {k: v.to_dict() for k, v in self.liked.items()},
            "lift": self.lift.to_dict() if self.lift else None,
            "judge": self.report.get("judge"),
            "ci": self.report.get("ci"),
            "capability": [
                self.report.get("capability_base"),
                self.report.get("capability_candidate"),
            ],
            "example": self.example,
            "eval_timings": self.report.get("timings"),
        }


async def chat(
    http: httpx.AsyncClient,
    key: str,
    messages: list[dict[str, str]],
    *,
    model: str = "default",
    max_tokens: int,
    temperature: float,
) -> dict[str, Any]:
    r = await http.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        },
    )
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


async def ask_all(
    http: httpx.AsyncClient,
    key: str,
    conversations: Sequence[list[dict[str, str]]],
    *,
    model: str = "default",
    max_tokens: int,
    temperature: float,
    concurrency: int = 16,
) -> list[dict[str, Any]]:
    """Every conversation once, ``concurrency`` at a time (the serving tier batches them)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(messages: list[dict[str, str]]) -> dict[str, Any]:
        async with gate:
            return await chat(
                http, key, messages, model=model, max_tokens=max_tokens, temperature=temperature
            )

    return list(await asyncio.gather(*(one(m) for m in conversations)))


def _text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"] or "")


async def serve_and_rate(
    http: httpx.AsyncClient,
    keys: dict[str, str],
    persona: Persona,
    questions: Sequence[str],
    *,
    result: TenantResult,
    seed: int,
    max_tokens: int,
    rate_share: float = 0.5,
    flip_share: float = 0.1,
) -> list[tuple[str, str]]:
    """Realistic traffic: each question asked once through ``/v1/chat/completions``, a share of
    the answers rated by the tenant's users through ``/v1/feedback`` by interaction id.
    Returns the liked (question, answer) pairs (the few-shot examples)."""
    answers = await ask_all(
        http,
        keys["product"],
        [[{"role": "user", "content": q}] for q in questions],
        max_tokens=max_tokens,
        temperature=0.7,
    )
    texts = [_text(a) for a in answers]
    thumbs = simulate_thumbs(
        persona,
        questions,
        texts,
        rate_share=rate_share,
        flip_share=flip_share,
        seed=seed,
        user_prefix=f"{result.name}-user",
    )
    items = [
        {
            "interaction_id": answers[t.index]["choices"][0]["interaction_id"],
            "rating": t.rating,
            "user_id": t.user_id,
        }
        for t in thumbs
    ]
    for start in range(0, len(items), 1000):
        r = await http.post(
            "/v1/feedback",
            headers={"Authorization": f"Bearer {keys['product']}"},
            json={"items": items[start : start + 1000]},
        )
        r.raise_for_status()
    result.thumbs, result.ups = len(thumbs), sum(t.rating > 0 for t in thumbs)
    return [(questions[t.index], texts[t.index]) for t in thumbs if t.rating > 0]


def few_shot(liked: Sequence[tuple[str, str]], question: str) -> list[dict[str, str]]:
    """The base model with ``FEW_SHOT`` of the tenant's liked answers as earlier turns."""
    messages: list[dict[str, str]] = []
    for q, a in list(liked)[:FEW_SHOT]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*messages, {"role": "user", "content": question}]


async def held_out_liked(
    http: httpx.AsyncClient,
    keys: dict[str, str],
    persona: Persona,
    questions: Sequence[str],
    liked: Sequence[tuple[str, str]],
    *,
    result: TenantResult,
    max_tokens: int,
    base_answers: Sequence[str] | None = None,
) -> list[str]:
    """Held-out questions (never asked in traffic) answered greedily by base, few-shot and the
    run's adapter (by its version id, promoted or not), judged by the tenant's typical user with
    relevance. Returns the base answers (reusable for tenants on the same base)."""
    plain = [[{"role": "user", "content": q}] for q in questions]
    if base_answers is None:
        base_answers = [
            _text(a)
            for a in await ask_all(
                http, keys["product"], plain, model="base", max_tokens=max_tokens, temperature=0
            )
        ]
    gate = asyncio.Semaphore(16)

    async def with_shots(question: str) -> str:
        # Eight liked answers, or as many as fit the model's context (the tiny test model's is
        # 1,024 tokens; SmolLM2's 8,192 takes all eight).
        n = FEW_SHOT
        while True:
            try:
                async with gate:
                    answer = await chat(
                        http,
                        keys["product"],
                        few_shot(list(liked)[:n], question),
                        model="base",
                        max_tokens=max_tokens,
                        temperature=0,
                    )
                return _text(answer)
            except httpx.HTTPStatusError as exc:
                if n == 0 or "context_length_exceeded" not in exc.response.text:
                    raise
                n //= 2

    shots = list(await asyncio.gather(*(with_shots(q) for q in questions)))
    columns = {"base": list(base_answers), "few-shot": shots}
    version = result.run.get("adapter_version_id")
    if version:
        columns["adapter"] = [
            _text(a)
            for a in await ask_all(
                http, keys["product"], plain, model=version, max_tokens=max_tokens, temperature=0
            )
        ]
    hits = {
        name: [float(persona.likes(t, q)) for q, t in zip(questions, texts, strict=True)]
        for name, texts in columns.items()
    }
    for name, liked_or_not in hits.items():
        result.liked[name] = proportion(sum(liked_or_not), len(questions))
    if "adapter" in hits:
        result.lift = paired_difference(hits["adapter"], hits["base"])
    if "adapter" in columns:
        result.example = {
            "question": questions[0],
            "base": base_answers[0],
            "adapter": columns["adapter"][0],
        }
    return list(base_answers)


async def run_and_wait(
    http: httpx.AsyncClient,
    admin_key: str,
    *,
    poll_s: float = 3.0,
    say: Any = None,
    method: str | None = None,
) -> dict[str, Any]:
    """Start a personalization run (with the policy's method, or ``method``) and follow it to
    its end, reporting each change."""
    auth = {"Authorization": f"Bearer {admin_key}"}
    r = await http.post("/v1/runs", json={"method": method} if method else {}, headers=auth)
    r.raise_for_status()
    run_id, last = r.json()["id"], ""
    while True:
        run: dict[str, Any] = (await http.get(f"/v1/runs/{run_id}", headers=auth)).json()
        p = run.get("progress") or {}
        line = run["status"]
        if p.get("step"):
            line += f", step {p['step']}/{p.get('total_steps')}"
        if line != last and say is not None:
            say(line)
            last = line
        if run["status"] in FINISHED:
            return run
        await asyncio.sleep(poll_s)


async def eval_report(http: httpx.AsyncClient, admin_key: str, version_id: str) -> dict[str, Any]:
    r = await http.get("/v1/adapters", headers={"Authorization": f"Bearer {admin_key}"})
    r.raise_for_status()
    for v in r.json()["data"]:
        if v["id"] == version_id:
            report: dict[str, Any] = v.get("eval_report") or {}
            return report
    return {}


def _ci(est: dict[str, Any] | None) -> str:
    if not est:
        return "-"
    return f"{est['value']:.2f} [{est['low']:.2f}, {est['high']:.2f}]"


def _pct(est: Estimate | None) -> str:
    return f"{est.value:.0%}" if est is not None else "-"


def results_table(results: Sequence[TenantResult], title: str) -> Table:
    """The issue's table: one row per tenant."""
    table = Table(title=title)
    for col in (
        "tenant",
        "thumbs",
        "up share",
        "judge AUROC",
        "win rate [95 % CI]",
        "capability base → cand.",
        "liked base → few-shot → cand.",
        "decision",
    ):
        table.add_column(col)
    for r in results:
        ci = r.report.get("ci") or {}
        cap = (
            f"{r.report['capability_base']:.0%} → {r.report['capability_candidate']:.0%}"
            if r.report.get("capability_candidate") is not None
            else "-"
        )
        liked = " → ".join(_pct(r.liked.get(k)) for k in ("base", "few-shot", "adapter"))
        if r.lift is not None:
            pts = [round(100 * x) for x in (r.lift.value, r.lift.low, r.lift.high)]
            liked += f" ({pts[0]:+d} pts [{pts[1]:+d}, {pts[2]:+d}])"
        n = r.liked.get("base")
        table.add_row(
            f"{r.name} ({r.persona})",
            str(r.thumbs),
            f"{r.ups / r.thumbs:.0%}" if r.thumbs else "-",
            _ci(ci.get("judge_auroc")),
            _ci(ci.get("win_rate")),
            cap,
            liked + (f" (n={n.n})" if n else ""),
            ("promoted" if r.promoted else "not promoted") + f" ({r.run.get('status', '?')})",
        )
    return table
