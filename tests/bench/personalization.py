"""Personalization benchmark: do two tenants with opposite tastes each get what they like?

Two simulated tenants share one base model (SmolLM2-135M-Instruct by default): ``concise`` likes
answers under 40 words, ``detailed`` likes answers over 80 words. For each tenant we

1. sample several answers per training prompt from the base model and let the tenant's simulated
   users vote on them. SmolLM2 answers at length by default, so half the samples are drawn with
   "Answer in one short sentence." appended to the question (a system prompt does not move this
   model); the votes are recorded against the plain question, as if the product had shown them;
2. compile the votes (DPO pairs; KTO when there are too few pairs) and train a LoRA adapter;
3. answer held-out prompts (never voted on) greedily with the base model, the tenant's own adapter
   and the other tenant's adapter, and count the share of answers the tenant's judge likes.

It prints a table and writes JSON to ``tests/bench/results/``. Run on purpose, not in the suite::

    .venv/bin/python tests/bench/personalization.py --quick     # minutes: a smoke run
    .venv/bin/python tests/bench/personalization.py             # the real numbers (tens of minutes)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer import (
    DEMO_PROMPTS,
    PERSONAS,
    FeedbackRecord,
    NotEnoughData,
    TrainSpec,
    collect_feedback,
    compile_feedback,
    generate_answers,
    load_base_model,
    load_with_adapters,
    train,
)

logger = logging.getLogger("bench.personalization")

TENANTS = ("concise", "detailed")
HINTS = ("", " Answer in one short sentence.")
RESULTS = Path(__file__).parent / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sample(
    model: Any, tokenizer: Any, prompts: list[str], n: int, max_new_tokens: int, seed: int
) -> list[list[str]]:
    """``n`` answers per prompt, half under each system hint."""
    per_hint = max(1, n // len(HINTS))
    answers: list[list[str]] = [[] for _ in prompts]
    for h, hint in enumerate(HINTS):
        convs = [[{"role": "user", "content": p + hint}] for p in prompts]
        got = generate_answers(
            model,
            tokenizer,
            convs,
            num_answers=per_hint,
            max_new_tokens=max_new_tokens,
            temperature=0.8,
            seed=seed + h,
            batch_size=4,
        )
        for i, options in enumerate(got):
            answers[i].extend(options)
    return answers


def run(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir)
    out_dir = Path(args.work_dir)
    prompts = list(DEMO_PROMPTS)
    n_eval = args.eval_prompts
    train_prompts, eval_prompts = prompts[: args.train_prompts], prompts[-n_eval:]
    assert not set(train_prompts) & set(eval_prompts), "held-out prompts must be unseen"

    started = time.monotonic()
    model, tokenizer = load_base_model(args.base, data_dir=data_dir)
    t0 = time.monotonic()
    samples = _sample(model, tokenizer, train_prompts, args.answers, args.max_new_tokens, args.seed)
    sampling_s = time.monotonic() - t0
    del model

    tenants: dict[str, dict[str, Any]] = {}
    adapters: dict[str, Path] = {}
    for name in TENANTS:
        persona = PERSONAS[name]
        records: list[FeedbackRecord] = collect_feedback(
            persona, train_prompts, samples, user_id=f"bench-{name}"
        )
        ups = sum(r.rating > 0 for r in records)
        try:
            data = compile_feedback(records, holdout_fraction=0.0, min_records=4)
        except NotEnoughData as exc:
            logger.warning("tenant %s: %s", name, exc)
            tenants[name] = {"error": str(exc), "up_votes": ups, "votes": len(records)}
            continue
        spec = TrainSpec(
            base_model=args.base,
            data=data,
            output_dir=out_dir / name,
            data_dir=data_dir,
            method="auto",  # DPO with enough pairs, else KTO on the unpaired thumbs
            max_steps=args.steps,
            batch_size=args.batch_size,
            rank=args.rank,
            learning_rate=args.learning_rate,
            max_length=args.max_length,
            min_pairs=args.min_pairs,
            seed=args.seed,
        )
        t0 = time.monotonic()
        try:
            result = train(spec)
        except NotEnoughData as exc:
            logger.warning("tenant %s: %s", name, exc)
            tenants[name] = {"error": str(exc), "data_card": data.card.to_dict()}
            continue
        tenants[name] = {
            "method": result.method,
            "steps": result.steps,
            "train_wall_s": round(time.monotonic() - t0, 1),
            "peak_rss_mb_after_train": round(_peak_rss_mb(), 1),
            "up_rate": data.card.up_rate,
            "pairs": data.card.pairs_train,
            "kto_examples": data.card.kto_train,
            "final_loss": result.metrics["final"].get("loss"),
            "final_margin": result.metrics["final"].get("rewards/margins"),
        }
        adapters[name] = result.adapter_dir

    model, tokenizer = load_with_adapters(args.base, adapters, data_dir=data_dir)
    convs = [[{"role": "user", "content": p}] for p in eval_prompts]
    answers: dict[str, list[str]] = {}
    for variant in ("base", *adapters):
        got = generate_answers(
            model,
            tokenizer,
            convs,
            adapter=variant,
            max_new_tokens=args.max_new_tokens,
            batch_size=4,
        )
        answers[variant] = [a[0] for a in got]

    for name in TENANTS:
        judge = PERSONAS[name].judge
        liked = {
            variant: sum(judge(c, a) for c, a in zip(convs, texts, strict=True)) / len(convs)
            for variant, texts in answers.items()
        }
        other = next(t for t in TENANTS if t != name)
        tenants[name]["liked_base"] = liked["base"]
        tenants[name]["liked_own"] = liked.get(name)
        tenants[name]["liked_other"] = liked.get(other)

    return {
        "benchmark": "personalization",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "base_model": args.base,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("data_dir", "work_dir", "out")
        },
        "train_prompts": len(train_prompts),
        "eval_prompts": len(eval_prompts),
        "sampling_s": round(sampling_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "tenants": tenants,
        "examples": {v: answers[v][:2] for v in answers},
    }


def _table(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "   -" if x is None else f"{100 * x:4.0f}%"

    lines = [
        f"personalization on {result['base_model']} "
        f"({result['train_prompts']} train / {result['eval_prompts']} held-out prompts)",
        "tenant     method  steps  train s   base   own adapter  other adapter",
    ]
    for name, t in result["tenants"].items():
        if "error" in t:
            lines.append(f"{name:<10} error: {t['error']}")
            continue
        lines.append(
            f"{name:<10} {t['method']:<6} {t['steps']:>6} {t['train_wall_s']:>8.1f}  "
            f"{pct(t['liked_base'])}  {pct(t['liked_own']):>11}  {pct(t['liked_other']):>13}"
        )
    lines.append(f"peak RSS {result['peak_rss_mb']:.0f} MB, total {result['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run in a few minutes")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("TUNELOOP_DATA_DIR", ".tuneloop"))
    parser.add_argument("--work-dir", default=None, help="where adapters go (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = {
        "train_prompts": 8,
        "eval_prompts": 4,
        "answers": 2,
        "max_new_tokens": 128,
        "steps": 4,
        "batch_size": 2,
    }
    full = {
        "train_prompts": 32,
        "eval_prompts": 12,
        "answers": 4,
        "max_new_tokens": 160,
        "steps": 60,
        "batch_size": 4,
    }
    for key, value in (quick if args.quick else full).items():
        setattr(args, key, value)
    args.rank, args.learning_rate, args.max_length, args.min_pairs = 16, 5e-4, 384, 4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.work_dir is None:
        import tempfile

        args.work_dir = tempfile.mkdtemp(prefix="tuneloop-bench-")
    result = run(args)
    print(_table(result))  # a benchmark script's output is its table
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"personalization-{'quick-' if args.quick else ''}{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
