"""Personalization benchmark: do two tenants with opposite tastes each get what they like?

Two simulated tenants share one base model (SmolLM2-135M-Instruct by default): ``concise`` likes
answers under 40 words, ``detailed`` likes answers over 80 words. For each tenant we

1. sample several answers per training prompt from the base model and let the tenant's simulated
   users vote on them. SmolLM2 answers at length by default, so half the samples are drawn with
   "Answer in one short sentence." appended to the question (a system prompt does not move this
   model); the votes are recorded against the plain question, as if the product had shown them;
2. compile the votes and train two LoRA adapters on them: DPO on the pairs (``method="auto"``,
   which falls back to KTO when there are too few pairs) and KTO on the same thumbs taken as
   unpaired examples (the case of a tenant whose users rarely rate two answers to one prompt);
3. answer held-out prompts (never voted on) greedily with the base model, the tenant's own DPO and
   KTO adapters and the other tenant's adapters, and count the share of answers the tenant's judge
   likes;
4. measure each adapter's regression on the shared prompt set with ``trainer.evaluate`` (mean
   per-token KL from the base model and the perplexity change) against the default
   :class:`~trainer.GatePolicy` bounds.

Training is timed in wall seconds and process CPU-seconds (the cores may be shared, and CPU time
is much less affected by that), with the process's peak RSS after each run. The compiled datasets
are written next to the results (``results/data/<tenant>/``), where ``trainer_throughput.py``
picks them up.

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
    CompiledDataset,
    FeedbackRecord,
    GatePolicy,
    NotEnoughData,
    TrainProgress,
    TrainSpec,
    collect_feedback,
    compile_feedback,
    evaluate,
    generate_answers,
    load_base_model,
    load_with_adapters,
    train,
    write_jsonl,
)

logger = logging.getLogger("bench.personalization")

TENANTS = ("concise", "detailed")
HINTS = ("", " Answer in one short sentence.")
RESULTS = Path(__file__).parent / "results"
METHODS = ("dpo", "kto")  # "dpo" runs as method="auto": KTO when there are too few pairs


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


def _train_one(
    args: argparse.Namespace,
    tenant: str,
    method: str,
    data: CompiledDataset,
    out_dir: Path,
    data_dir: Path,
) -> dict[str, Any]:
    """Train one adapter; its timing, loss and (under ``adapter_dir``) where it went."""
    spec = TrainSpec(
        base_model=args.base,
        data=data,
        output_dir=out_dir / f"{tenant}-{method}",
        data_dir=data_dir,
        method="auto" if method == "dpo" else "kto",
        max_steps=args.steps,
        batch_size=args.batch_size,
        rank=args.rank,
        learning_rate=args.learning_rate,
        beta=args.beta,
        max_length=args.max_length,
        min_pairs=args.min_pairs,
        seed=args.seed,
    )
    t0, c0 = time.monotonic(), time.process_time()

    def progress(p: TrainProgress) -> None:
        logger.info(
            "%s-%s step %d/%d loss %.4f, %.0f s wall, %.0f CPU-s",
            tenant,
            method,
            p.step,
            p.total_steps,
            p.loss if p.loss is not None else float("nan"),
            time.monotonic() - t0,
            time.process_time() - c0,
        )

    try:
        result = train(spec, progress=progress)
    except NotEnoughData as exc:
        logger.warning("tenant %s, %s: %s", tenant, method, exc)
        return {"error": str(exc)}
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    logger.info("tenant %s: %s done in %.0f s wall, %.0f CPU-s", tenant, method, wall, cpu)
    return {
        "method": result.method,
        "steps": result.steps,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "s_per_step": round(wall / max(result.steps, 1), 2),
        "cpu_s_per_step": round(cpu / max(result.steps, 1), 2),
        "peak_rss_mb_after_train": round(_peak_rss_mb(), 1),
        "final_loss": result.metrics["final"].get("loss"),
        "final_margin": result.metrics["final"].get("rewards/margins"),
        "adapter_dir": str(result.adapter_dir),
    }


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
    adapters: dict[str, Path] = {}  # "<tenant>-<method>" -> adapter directory
    datasets: dict[str, CompiledDataset] = {}
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
        datasets[name] = data
        write_jsonl(data, Path(args.out) / "data" / name)
        tenants[name] = {
            "votes": len(records),
            "up_rate": data.card.up_rate,
            "pairs": data.card.pairs_train,
            "kto_examples": data.card.kto_train,
            "runs": {},
        }
        for method in METHODS:
            if method == "kto" and tenants[name]["runs"]["dpo"].get("method") == "kto":
                # too few pairs: "auto" already trained KTO on these thumbs
                tenants[name]["runs"]["kto"] = {"same_as": "dpo"}
                adapters[f"{name}-kto"] = adapters[f"{name}-dpo"]
                continue
            run_info = _train_one(args, name, method, data, out_dir, data_dir)
            tenants[name]["runs"][method] = run_info
            if "adapter_dir" in run_info:
                adapters[f"{name}-{method}"] = Path(run_info.pop("adapter_dir"))
        runs = tenants[name]["runs"].values()
        tenants[name]["train_wall_s"] = round(sum(r.get("train_wall_s", 0.0) for r in runs), 1)
        tenants[name]["train_cpu_s"] = round(sum(r.get("train_cpu_s", 0.0) for r in runs), 1)

    t0 = time.monotonic()
    loaded = {  # one copy of each distinct adapter
        v: a
        for v, a in adapters.items()
        if not v.endswith("-kto") or a != adapters.get(v[:-3] + "dpo")
    }
    model, tokenizer = load_with_adapters(args.base, loaded, data_dir=data_dir)
    convs = [[{"role": "user", "content": p}] for p in eval_prompts]
    answers: dict[str, list[str]] = {}
    for variant in ("base", *adapters):
        if variant != "base" and variant not in loaded:  # a KTO fallback shared with the "dpo" run
            answers[variant] = answers[variant[:-3] + "dpo"]
            continue
        got = generate_answers(
            model,
            tokenizer,
            convs,
            adapter=variant,
            max_new_tokens=args.max_new_tokens,
            batch_size=4,
        )
        answers[variant] = [a[0] for a in got]
    del model
    answer_s = time.monotonic() - t0

    for name in TENANTS:
        judge = PERSONAS[name].judge
        liked = {
            variant: sum(judge(c, a) for c, a in zip(convs, texts, strict=True)) / len(convs)
            for variant, texts in answers.items()
        }
        other = next(t for t in TENANTS if t != name)
        tenants[name]["liked_base"] = liked["base"]
        for method in METHODS:
            tenants[name][f"liked_own_{method}"] = liked.get(f"{name}-{method}")
            tenants[name][f"liked_other_{method}"] = liked.get(f"{other}-{method}")

    t0 = time.monotonic()
    policy = GatePolicy()
    regression: dict[str, dict[str, Any]] = {}
    for variant, adapter_dir in loaded.items():
        tenant = variant.rsplit("-", 1)[0]
        report = evaluate(
            base_model=args.base,
            candidate=adapter_dir,
            data=datasets[tenant],
            data_dir=data_dir,
            judge=None,
            candidate_label=variant,
        )
        kl, ppl_up = report.regression_kl, report.regression_ppl_increase
        regression[variant] = {
            "kl": kl,
            "ppl_base": report.regression_ppl_base,
            "ppl_adapter": report.regression_ppl_candidate,
            "ppl_increase": ppl_up,
            "prompts": report.n_regression_prompts,
            "within_bound": (
                kl is not None
                and ppl_up is not None
                and (policy.max_regression_kl is None or kl <= policy.max_regression_kl)
                and (policy.max_ppl_increase is None or ppl_up <= policy.max_ppl_increase)
            ),
        }
    regression_s = time.monotonic() - t0

    return {
        "benchmark": "personalization",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "base_model": args.base,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("data_dir", "work_dir", "out")
        },
        "train_prompts": len(train_prompts),
        "eval_prompts": len(eval_prompts),
        "sampling_s": round(sampling_s, 1),
        "answering_s": round(answer_s, 1),
        "regression_s": round(regression_s, 1),
        "regression_bound": {
            "max_kl": policy.max_regression_kl,
            "max_ppl_increase": policy.max_ppl_increase,
        },
        "regression": regression,
        "total_s": round(time.monotonic() - started, 1),
        "total_cpu_s": round(time.process_time(), 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "tenants": tenants,
        "examples": {v: answers[v][:2] for v in answers},
    }


def _table(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "    -" if x is None else f"{100 * x:4.0f}%"

    lines = [
        f"personalization on {result['base_model']} "
        f"({result['train_prompts']} train / {result['eval_prompts']} held-out prompts)",
        "",
        "share of held-out answers the tenant's judge likes",
        "tenant     votes  up%  pairs   base  own DPO  own KTO  other DPO  other KTO",
    ]
    for name, t in result["tenants"].items():
        if "error" in t:
            lines.append(f"{name:<10} error: {t['error']}")
            continue
        lines.append(
            f"{name:<10} {t['votes']:>5} {pct(t['up_rate'])} {t['pairs']:>6}  "
            f"{pct(t['liked_base'])}  {pct(t['liked_own_dpo']):>7}  {pct(t['liked_own_kto']):>7}  "
            f"{pct(t['liked_other_dpo']):>9}  {pct(t['liked_other_kto']):>9}"
        )
    lines += [
        "",
        "training (wall s / process CPU-s; peak RSS of the process so far)",
        "tenant     run  method steps  wall s  CPU s  s/step  CPU-s/step  RSS MB  loss    margin",
    ]
    for name, t in result["tenants"].items():
        for run_name, r in t.get("runs", {}).items():
            if "error" in r:
                lines.append(f"{name:<10} {run_name:<4} error: {r['error']}")
                continue
            loss, margin = r["final_loss"], r["final_margin"]
            lines.append(
                f"{name:<10} {run_name:<4} {r['method']:<6} {r['steps']:>5} "
                f"{r['train_wall_s']:>7.1f} {r['train_cpu_s']:>6.1f} {r['s_per_step']:>7.2f} "
                f"{r['cpu_s_per_step']:>11.2f} {r['peak_rss_mb_after_train']:>7.0f}  "
                f"{'-' if loss is None else f'{loss:.3f}':<7} "
                f"{'-' if margin is None else f'{margin:.2f}'}"
            )
        if "runs" in t:
            lines.append(
                f"{name:<10} all  training per tenant: {t['train_wall_s']:.0f} s wall, "
                f"{t['train_cpu_s']:.0f} CPU-s"
            )
    bound = result["regression_bound"]
    lines += [
        "",
        f"regression on the shared prompt set (bound: KL <= {bound['max_kl']}, "
        f"perplexity change <= {bound['max_ppl_increase']:+.2f})",
        "adapter          KL/token  ppl base  ppl adapter  change  within bound",
    ]
    for variant, r in result["regression"].items():
        lines.append(
            f"{variant:<16} {r['kl']:>8.4f} {r['ppl_base']:>9.2f} {r['ppl_adapter']:>12.2f} "
            f"{r['ppl_increase']:>+7.3f}  {'yes' if r['within_bound'] else 'NO'}"
        )
    lines.append(
        f"sampling {result['sampling_s']:.0f} s, answering {result['answering_s']:.0f} s, "
        f"regression {result['regression_s']:.0f} s; peak RSS {result['peak_rss_mb']:.0f} MB, "
        f"total {result['total_s']:.0f} s wall, {result['total_cpu_s']:.0f} CPU-s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run in a few minutes")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("TUNELOOP_DATA_DIR", ".tuneloop"))
    parser.add_argument("--work-dir", default=None, help="where adapters go (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--seed", type=int, default=0)
    sizes = ("train_prompts", "eval_prompts", "answers", "max_new_tokens", "steps", "batch_size")
    for key in sizes:
        parser.add_argument(
            "--" + key.replace("_", "-"), type=int, default=None, help="override the preset"
        )
    # The product's defaults unless overridden: the benchmark measures what tenants get.
    defaults = TrainSpec.__dataclass_fields__
    parser.add_argument("--rank", type=int, default=defaults["rank"].default)
    parser.add_argument("--learning-rate", type=float, default=defaults["learning_rate"].default)
    parser.add_argument("--beta", type=float, default=defaults["beta"].default)
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
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
    for key, value in {**(quick if args.quick else full), **overrides}.items():
        setattr(args, key, value)
    args.overrides = sorted(overrides)
    args.max_length, args.min_pairs = 384, 4
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
