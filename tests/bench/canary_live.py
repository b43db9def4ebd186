"""Live canary benchmark: simulated users rate real answers of real adapter versions, served by
the gateway, through the canary's split; does the rule promote a version its users like clearly
more, keep one they like the same, and roll back one they like less, and after how many thumbs?

Two phases:

1. **Answers, live.** A tenant on the product's API (the gateway on the local serving tier, the
   real base model) gets two versions registered: ``--candidate``, an adapter trained for the
   persona (by default the newest adapter the personalization bench left in
   ``.tuneloop-bench``: ``python -m tests.bench.personalization --personas bullets --methods kto
   --noise-seeds 0``), and a version that answers as the base model does (a LoRA whose B
   matrices are zero, PEFT's own initialization). Every question the candidate was not trained
   on is asked ``--samples`` times of each version and of ``base``, through
   ``/v1/chat/completions`` with the product key, sampled at ``--temperature``.
2. **Canaries, replayed.** Each seed is one canary with the persona's users (thresholds of their
   own, a log-normal activity each, so thumbs cluster by user as real ones do), each user on the
   arm ``core.canary.in_canary`` puts them on, asking a random question and getting one of their
   arm's live answers to it; half the answers rated, one rating in ten flipped (the realistic
   traffic), relevance judged; the rule (``core.canary.decide`` with the users' design effect,
   the product's defaults) asked after every thumb, as in ``canary.py``, whose loop this shares.

Generating every request of every canary live would take hours per seed on these CPUs (a canary
needs hundreds to thousands of requests); the answers are live, the traffic is replayed over
them. The answers of ``base`` and the zero adapter, one distribution, are pooled into one
"base-like" arm (see ``BASE_LIKE``). Scenarios: **better** (current base-like, candidate the
trained adapter), **equal** (base-like on both arms), **worse** (current the trained adapter,
candidate base-like). The table gives each arm's share of live answers the typical user likes
(n: the answers, each judged once) beside the decisions, and each version's share above it.
Run on purpose, not in the suite::

    .venv/bin/python -m tests.bench.canary_live                  # 20 seeds per scenario
    .venv/bin/python -m tests.bench.canary_live --seeds 50 --answers tests/bench/results/X.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from api.app import create_app
from core.artifacts import ArtifactStore
from core.canary import CanaryRule, in_canary
from core.db import create_engine, create_sessionmaker
from core.keys import create_key
from core.models import KeyRole
from core.settings import ApiSettings
from serving import registry
from tests.bench.canary import Outcome, add_traffic_arguments, run_canary, share, thumbs_to
from trainer.simulated_users import Persona, get_persona, question_pool
from trainer.stats import Estimate, proportion
from tuneloop.runtime import ensure_schema
from tuneloop.simulation import split_questions

RESULTS = Path(__file__).parent / "results"
BASE = "base"
TRAINED = "trained"
SAME_AS_BASE = "same-as-base"
BASE_LIKE = (BASE, SAME_AS_BASE)
"""Two versions with one distribution of answers (a zero LoRA adds nothing): their live answers
are pooled, so that "equal" arms are equal in the replay too. Kept apart, each version's few
hundred answers would differ by sampling alone (by 2 points here), and a canary replaying them
thousands of times would be comparing that accident, not the versions."""
SCENARIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "better": (BASE_LIKE, (TRAINED,)),
    "equal": (BASE_LIKE, BASE_LIKE),
    "worse": ((TRAINED,), BASE_LIKE),
}
"""Scenario: (the current arm's versions, the candidate arm's), answers pooled per arm."""


def newest_bench_adapter(data_dir: Path) -> Path:
    found = sorted(
        (data_dir / "artifacts").glob("**/adapter_model.safetensors"),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        sys.exit(
            f"no adapter under {data_dir}/artifacts: train one first (python -m "
            "tests.bench.personalization --personas bullets --methods kto --noise-seeds 0) or "
            "pass --candidate DIR"
        )
    return found[-1].parent


def zero_adapter(settings: ApiSettings, like: Path, out: Path) -> Path:
    """A LoRA of ``like``'s shape whose B matrices are zero (PEFT's initialization): a real
    version that answers exactly as the base model does."""
    from peft import LoraConfig, get_peft_model

    from trainer.base_models import load_base_model

    config = json.loads((like / "adapter_config.json").read_text())
    model, _ = load_base_model(settings.base_model, data_dir=settings.data_dir)
    lora = LoraConfig(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        target_modules=config["target_modules"],
        init_lora_weights=True,
    )
    get_peft_model(model, lora).save_pretrained(str(out))
    for extra in out.iterdir():  # keep only what the store keeps
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    return out


async def live_answers(
    args: argparse.Namespace, candidate: Path, questions: list[str], console: Console
) -> dict[str, dict[str, list[str]]]:
    """``answers[version][question]``: ``--samples`` answers each, through the gateway."""
    data_dir = Path(args.data_dir)
    settings = ApiSettings(data_dir=data_dir, base_model=args.base)
    engine = create_engine(settings)
    await ensure_schema(engine, settings)
    sessions = create_sessionmaker(engine)
    async with sessions() as session:
        operator = await create_key(session, tenant_id=None, role=KeyRole.platform, name="bench")
        await session.commit()
    app = create_app(settings, engine=engine)
    store = ArtifactStore(data_dir / "artifacts")
    zero = zero_adapter(settings, candidate, data_dir / "same-as-base")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench", timeout=900
        ) as http:
            r = await http.post(
                "/v1/tenants",
                headers={"Authorization": f"Bearer {operator.secret}"},
                json={"slug": f"canary-live-{time.strftime('%H%M%S')}"},
            )
            r.raise_for_status()
            tenant_id, product = r.json()["tenant"]["id"], r.json()["product_key"]["key"]
            models = {BASE: "base"}
            for name, files in ((TRAINED, candidate), (SAME_AS_BASE, zero)):
                async with sessions() as session:
                    version = await registry.register_adapter(
                        session,
                        store,
                        tenant_id=tenant_id,
                        adapter_dir=files,
                        base_model=args.base,
                    )
                models[name] = version.id
            gate = asyncio.Semaphore(16)  # the local tier batches what arrives together
            done = itertools.count(1)
            total = len(models) * len(questions) * args.samples
            started = time.monotonic()

            async def ask(model: str, question: str) -> str:
                async with gate:
                    r = await http.post(
                        "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {product}"},
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": question}],
                            "max_tokens": args.max_tokens,
                            # No seed: the local tier runs a seeded request alone, unbatched.
                            "temperature": args.temperature,
                        },
                    )
                r.raise_for_status()
                n = next(done)
                if n % 100 == 0 or n == total:
                    print(f"  {n}/{total} answers, {time.monotonic() - started:.0f} s", flush=True)
                return str(r.json()["choices"][0]["message"]["content"] or "")

            answers: dict[str, dict[str, list[str]]] = {}
            for name, model in models.items():
                got = await asyncio.gather(
                    *(ask(model, q) for q in questions for _ in range(args.samples))
                )
                answers[name] = {
                    q: got[i * args.samples : (i + 1) * args.samples]
                    for i, q in enumerate(questions)
                }
            return answers
    finally:
        await app.state.backend.close()
        await engine.dispose()


def pooled(
    answers: dict[str, dict[str, list[str]]], versions: tuple[str, ...]
) -> dict[str, list[str]]:
    """Each question's live answers from ``versions``, together."""
    return {q: [a for v in versions for a in answers[v][q]] for q in answers[versions[0]]}


def liked_share(persona: Persona, arm: dict[str, list[str]]) -> Estimate:
    """How many of the arm's live answers the persona's typical user likes (n: answers, each
    judged once; a replay draws them many times, which adds no evidence)."""
    judged = [persona.likes(a, q) for q, got in arm.items() for a in got]
    return proportion(sum(judged), len(judged))


def _pct(e: Estimate) -> str:
    return f"{e.value:.1%} [{e.low:.1%}, {e.high:.1%}] (n={e.n})"


def live_canary(
    arms: tuple[dict[str, list[str]], dict[str, list[str]]],
    args: argparse.Namespace,
    rule: CanaryRule,
    seed: int,
) -> Outcome:
    """One canary, each request answered with one of its arm's live answers."""
    persona = get_persona(args.persona)
    rng = random.Random(seed)
    users = persona.users(args.users, rng, prefix=f"u{seed}")
    activity = list(itertools.accumulate(rng.lognormvariate(0.0, 1.0) for _ in users))
    on_candidate = [in_canary(u.user_id, args.fraction, f"canary-{seed}") for u in users]
    questions = sorted(arms[0])

    def liked(i: int, arm: bool, rng: random.Random) -> bool:
        question = rng.choice(questions)
        answer = rng.choice(arms[arm][question])
        return persona.likes(answer, question, threshold=users[i].threshold)

    return run_canary(liked, activity, on_candidate, args, rule, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persona", default="bullets")
    parser.add_argument("--candidate", help="the trained adapter's PEFT directory")
    parser.add_argument("--bench-dir", default=".tuneloop-bench", help="where to find it else")
    parser.add_argument("--answers", help="reuse the live answers of an earlier run (its JSON)")
    parser.add_argument("--data-dir", default=".tuneloop-bench-canary")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--traffic", type=int, default=240, help="questions it was trained on")
    parser.add_argument("--samples", type=int, default=3, help="answers per question and version")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seeds", type=int, default=20, help="canaries per scenario (>= 20)")
    add_traffic_arguments(parser)
    args = parser.parse_args()
    args.cluster_robust = True  # as the product counts thumbs
    if args.seeds < 20:
        sys.exit("--seeds must be at least 20")
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    started = time.monotonic()
    if args.answers:
        saved = json.loads(Path(args.answers).read_text())
        answers, candidate = saved["answers"], saved["candidate"]
    else:
        path = (
            Path(args.candidate) if args.candidate else newest_bench_adapter(Path(args.bench_dir))
        )
        candidate = str(path)
        # The questions the personalization bench did not serve to its tenants: new to the
        # adapter, as a canary's traffic is.
        trained_on = set(split_questions(args.traffic, 0, seed=0)[0])
        questions = [q.text for q in question_pool() if q.text not in trained_on]
        console.print(
            f"live answers: {len(questions)} questions x {args.samples} x 3 versions, "
            f"candidate {candidate}"
        )
        answers = asyncio.run(live_answers(args, path, questions, console))
    answer_s = time.monotonic() - started
    rule = CanaryRule()
    persona = get_persona(args.persona)
    results: dict[str, list[Outcome]] = {}
    liked: dict[str, list[Estimate]] = {}
    for name, versions in SCENARIOS.items():
        arms = (pooled(answers, versions[0]), pooled(answers, versions[1]))
        liked[name] = [liked_share(persona, arm) for arm in arms]
        results[name] = [live_canary(arms, args, rule, seed) for seed in range(args.seeds)]
    by_version = {v: liked_share(persona, pooled(answers, (v,))) for v in answers}
    console.print(
        "liked by the typical user, per version: "
        + "; ".join(
            f"{v} {e.value:.1%} [{e.low:.1%}, {e.high:.1%}] (n={e.n})"
            for v, e in by_version.items()
        )
    )
    table = Table(
        title=f"live canary ({args.persona} users), {args.seeds} seeds each: share of canaries "
        "[95 % CI]; thumbs (both arms) to decision, median [p10, p90]"
    )
    for col in (
        "scenario",
        "current → candidate",
        "liked current [95 % CI]",
        "liked candidate [95 % CI]",
        "promoted",
        "rolled back",
        "time ran out",
        "thumbs to promote",
        "thumbs to roll back",
    ):
        table.add_column(col)
    out_scenarios: dict[str, Any] = {}
    for name, outcomes in results.items():
        table.add_row(
            name,
            " → ".join("+".join(v) for v in SCENARIOS[name]),
            *(_pct(e) for e in liked[name]),
            share(outcomes, "promote"),
            share(outcomes, "rollback"),
            share(outcomes, "expire"),
            thumbs_to(outcomes, "promote"),
            thumbs_to(outcomes, "rollback"),
        )
        out_scenarios[name] = {
            "versions": SCENARIOS[name],
            "liked": {"current": liked[name][0].to_dict(), "candidate": liked[name][1].to_dict()},
            "outcomes": [asdict(o) for o in outcomes],
            **{
                a: proportion(sum(o.action == a for o in outcomes), len(outcomes)).to_dict()
                for a in ("promote", "rollback", "expire")
            },
        }
    console.print(table)
    console.print(
        f"answers {answer_s:.0f} s; canaries {time.monotonic() - started - answer_s:.0f} s"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    if not args.answers:
        kept = RESULTS / f"canary_live-answers-{stamp}.json"
        kept.write_text(json.dumps({"candidate": candidate, "answers": answers}) + "\n")
        console.print(f"wrote {kept} (reuse with --answers)")
    path = RESULTS / f"canary_live-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": "canary_live",
                "when": datetime.now(UTC).isoformat(),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "args": vars(args),
                "candidate": candidate,
                "rule": asdict(rule),
                "answers_s": round(answer_s, 1),
                "liked_by_version": {v: e.to_dict() for v, e in by_version.items()},
                "scenarios": out_scenarios,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
