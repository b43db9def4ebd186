"""Judge quality: does the tenant's thumbs judge learn what its users like from realistic logs,
does it know when it does, and how often is a coin-flip tenant's judge trusted?

The gate and GRPO lean on the judge (:mod:`trainer.judge`); the personalization benchmark sees it
only through a whole run per tenant. This one isolates it, many seeds per persona in minutes:

1. Base answers, two per question of the pool, sampled as the product serves traffic
   (temperature 0.7, 96 tokens), generated once and cached in ``results/``.
2. Per persona and seed: 240 questions are the tenant's traffic (one of the two answers each),
   rated as :func:`trainer.simulated_users.simulate_thumbs` rates them (half rated, one in ten
   flipped, five users with thresholds of their own, relevance judged), compiled by the product's
   compiler, and the judge is fitted exactly as a run fits it.
3. ``self``: the AUROC the judge reports about itself on thumbs it never saw (what decides
   whether it is trusted). ``true``: its AUROC on the other questions' answers (both of each,
   about 270) labelled by the persona's typical user without flips: how well it knows the taste.
   A coin has no taste: for ``noise`` only how often it is trusted counts.

Each description of an answer (``--features``: hidden states, text statistics, the chosen one)
is fitted on the same thumbs, side by side. The base model is frozen, so each answer's hidden
states are read once and reused across seeds and descriptions (:func:`_read_once`); everything
else is the product's code. Besides the simulated users' personas, two tastes
the text statistics cannot see: ``careful`` (likes answers that mention care, safety or a
professional) and ``direct`` (likes answers that talk to the reader: "you" in at least 3-5 %
of the words).

    .venv/bin/python -m tests.bench.judge_quality        # -> results/judge_quality-*.json
    .venv/bin/python -m tests.bench.judge_quality --personas plain,noise --seeds 10
    .venv/bin/python -m tests.bench.judge_quality --summarize <a JSON it wrote>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import trainer.judge as judge_module
from trainer.base_models import SMOLLM2, load_base_model
from trainer.compiler import compile_feedback
from trainer.generation import generate_answers
from trainer.judge import FEATURE_SETS, HIDDEN, TEXT, ThumbsJudge, train_thumbs_judge
from trainer.simulated_users import (
    PERSONAS,
    Persona,
    question_pool,
    realistic_feedback,
    word_count,
)
from trainer.stats import auroc

RESULTS = Path(__file__).parent / "results"
TRAFFIC = 240
CHOSEN = "chosen"
CHOICES = {HIDDEN: (HIDDEN,), TEXT: (TEXT,), CHOSEN: FEATURE_SETS}
_CAREFUL = re.compile(
    r"\b(?:safe|safety|careful|caution|consult|professional|doctor|expert|risk)", re.IGNORECASE
)
_YOU = re.compile(r"\byou(?:r|rs|rself)?\b", re.IGNORECASE)
CONTENT_TASTES = {
    p.name: p
    for p in (
        Persona(
            "careful",
            "likes answers that mention care, safety or a professional (1-2 mentions, by user)",
            lambda a: float(len(_CAREFUL.findall(a))),
            "at_least",
            (1, 2),
            integer=True,
        ),
        Persona(
            "direct",
            "likes answers that talk to the reader: 'you' in at least 3-5 % of the words",
            lambda a: 100.0 * len(_YOU.findall(a)) / max(1, word_count(a)),
            "at_least",
            (3, 5),
        ),
    )
}


def _read_once() -> None:
    """Memoize :func:`trainer.generation.answer_features` where the judge calls it: the same
    answers come back for every seed and description, and reading them is what takes time."""
    read = judge_module.answer_features
    memo: dict[tuple[str, str], list[float]] = {}

    def cached(model: Any, tokenizer: Any, items: Any, **kw: Any) -> list[list[float]]:
        keys = [(json.dumps(list(m)), a) for m, a in items]
        todo = [i for i, k in enumerate(keys) if k not in memo]
        kw.pop("beat", None)
        for i, row in zip(
            todo, read(model, tokenizer, [items[i] for i in todo], **kw), strict=True
        ):
            memo[keys[i]] = row
        return [memo[k] for k in keys]

    judge_module.answer_features = cached


def _persona(name: str) -> Persona:
    return CONTENT_TASTES.get(name) or PERSONAS[name]


def base_answers(model: Any, tokenizer: Any, cache: Path) -> tuple[list[str], list[list[str]]]:
    """Two sampled base answers per pool question (cached: ten minutes on two cores)."""
    questions = [q.text for q in question_pool()]
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["questions"] == questions:
            return questions, saved["answers"]
    started = time.monotonic()
    answers = generate_answers(
        model,
        tokenizer,
        [[{"role": "user", "content": q}] for q in questions],
        num_answers=2,
        max_new_tokens=96,
        temperature=0.7,
        seed=0,
        batch_size=16,
        on_batch=lambda done, total: print(
            f"\rbase answers {done}/{total} ({time.monotonic() - started:.0f} s)",
            end="",
            flush=True,
        ),
    )
    print()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"questions": questions, "answers": answers}) + "\n")
    return questions, answers


def one_tenant(
    model: Any,
    tokenizer: Any,
    persona: Persona,
    seed: int,
    questions: list[str],
    answers: list[list[str]],
    choices: list[str],
) -> dict[str, Any]:
    rng = random.Random(seed)
    order = list(range(len(questions)))
    rng.shuffle(order)
    traffic, unseen = order[:TRAFFIC], order[TRAFFIC:]
    asked = [questions[i] for i in traffic]
    served = [answers[i][rng.randrange(2)] for i in traffic]
    data = compile_feedback(realistic_feedback(persona, asked, served, seed=seed))
    test = [([{"role": "user", "content": questions[i]}], a) for i in unseen for a in answers[i]]
    liked = [persona.likes(a, m[0]["content"]) for m, a in test]
    out: dict[str, Any] = {
        "persona": persona.name,
        "seed": seed,
        "thumbs": len(data.kto_train) + len(data.kto_holdout),
        "up_share": sum(e.label for e in (*data.kto_train, *data.kto_holdout))
        / max(1, len(data.kto_train) + len(data.kto_holdout)),
    }
    for choice in choices:
        judge = train_thumbs_judge(
            model,
            tokenizer,
            base_model=SMOLLM2,
            train=data.kto_train,
            holdout=data.kto_holdout,
            seed=seed,
            features=CHOICES[choice],
        )
        if not isinstance(judge, ThumbsJudge):
            out[choice] = {"trusted": False, "reason": judge.reason}
            continue
        q = judge.quality
        row: dict[str, Any] = {
            "trusted": q.trusted,
            "self": q.auroc.to_dict() if q.auroc else None,
            "features": judge.features,
        }
        if persona.liked_when != "coin" and 0 < sum(liked) < len(liked):
            p = judge.probabilities(model, tokenizer, test)
            truth = auroc(
                [s for s, ok in zip(p, liked, strict=True) if ok],
                [s for s, ok in zip(p, liked, strict=True) if not ok],
            )
            row["true"] = truth.to_dict()
        out[choice] = row
    return out


def summary(rows: list[dict[str, Any]], choices: list[str]) -> Table:
    table = Table(title="thumbs judge on realistic traffic (SmolLM2 base answers)")
    for col in ("persona", "seeds", "thumbs", "up share", "judge on", "self AUROC", "true AUROC"):
        table.add_column(col)
    table.add_column("trusted")
    table.add_column("chosen description")
    for name in dict.fromkeys(r["persona"] for r in rows):
        mine = [r for r in rows if r["persona"] == name]
        for choice in choices:
            fits = [r[choice] for r in mine]
            selfs = [f["self"]["value"] for f in fits if f.get("self")]
            trues = [f["true"]["value"] for f in fits if f.get("true")]
            picked = [f.get("features", "-") for f in fits]
            table.add_row(
                name,
                str(len(mine)),
                f"{statistics.mean(r['thumbs'] for r in mine):.0f}",
                f"{statistics.mean(r['up_share'] for r in mine):.2f}",
                choice,
                _spread(selfs),
                _spread(trues) if trues else "-",
                f"{sum(f['trusted'] for f in fits)}/{len(fits)}",
                ", ".join(f"{d}: {picked.count(d)}" for d in FEATURE_SETS if d in picked)
                if choice == CHOSEN
                else "",
            )
    return table


def _spread(values: list[float]) -> str:
    """Mean, and the range over seeds (each value has its own interval in the JSON)."""
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--personas", default="plain,prose,bullets,concise,careful,direct,noise")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--features", default=f"{HIDDEN},{TEXT},{CHOSEN}")
    parser.add_argument("--data-dir", default=".tuneloop-bench")
    parser.add_argument("--summarize", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args()
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    if args.summarize:
        saved = json.loads(Path(args.summarize).read_text())
        console.print(summary(saved["rows"], saved["args"]["features"].split(",")))
        return
    personas = [p for p in args.personas.split(",") if p]
    choices = [c for c in args.features.split(",") if c]
    for p in personas:
        if p not in PERSONAS and p not in CONTENT_TASTES:
            sys.exit(f"unknown persona {p!r}; known: {', '.join([*PERSONAS, *CONTENT_TASTES])}")
    for c in choices:
        if c not in CHOICES:
            sys.exit(f"unknown --features {c!r}; known: {', '.join(CHOICES)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    model, tokenizer = load_base_model(SMOLLM2, data_dir=Path(args.data_dir))
    questions, answers = base_answers(model, tokenizer, RESULTS / "judge_quality-answers.json")
    _read_once()
    out = RESULTS / f"judge_quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows: list[dict[str, Any]] = []
    for name in personas:
        for seed in range(args.seeds):
            row = one_tenant(model, tokenizer, _persona(name), seed, questions, answers, choices)
            rows.append(row)
            console.print(
                f"{name} seed {seed}: "
                + "; ".join(
                    f"{c} self {row[c].get('self', {}).get('value', float('nan')):.3f}"
                    f"{' trusted' if row[c]['trusted'] else ''}"
                    for c in choices
                )
            )
            # Written after every tenant: an interrupted run keeps what it measured.
            result = {
                "benchmark": "judge_quality",
                "when": datetime.now(UTC).isoformat(),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "args": vars(args),
                "wall_s": round(time.monotonic() - started, 1),
                "rows": rows,
            }
            out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(summary(rows, choices))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
