"""Trainer throughput: ``trainer.train`` (our defaults) vs a plain TRL script with TRL's defaults.

Both train DPO with a LoRA adapter on the same compiled SmolLM2 preference data (a ``concise``
tenant's pairs, sampled in the simulated users' paired mode; ``personalization.py`` now runs
realistic, unpaired traffic through the product and writes no dataset here):

* ``ours``: ``trainer.train(TrainSpec(...))`` with our defaults; only the base model, data,
  method, rank, batch size and number of steps are given;
* ``trl-default``: the script a user would write from TRL's docs: ``AutoModelForCausalLM`` +
  ``DPOConfig(output_dir, per_device_train_batch_size, max_steps, report_to="none")`` +
  ``LoraConfig(r, target_modules="all-linear")`` + ``DPOTrainer``; everything else is as TRL ships
  it (``bf16=True``, ``gradient_checkpointing=True``, ``max_length=1024``, ...). On a machine
  without CUDA, TRL's defaults refuse to start ("Your setup doesn't support bf16/gpu. You need to
  assign use_cpu"), so ``use_cpu=True`` is the one setting added there. On a CPU without native
  bf16 a step takes minutes, so this variant runs fewer steps (``--trl-default-steps``);
* ``trl-fp32`` (the decomposition): the same plain script with only ``bf16=False`` added, to split
  the difference into what bf16 costs and what gradient checkpointing costs.

Each variant runs in its own process (so peak RSS is its own) and the variants run one after the
other. Tokens are what the model actually processed: the non-padding tokens of every collated
batch (prompt+chosen and prompt+rejected rows, after truncation; padded positions are reported
too). Per step we record wall seconds and process CPU-seconds (the cores may be shared with other
work: CPU-seconds are much less affected by that). The first step is reported on its own and left
out of the steady-state rate.

    .venv/bin/python tests/bench/trainer_throughput.py   # -> results/trainer_throughput.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.trainer_throughput")

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("ours", "trl-default", "trl-fp32")
# The config fields that can change speed, recorded for each variant.
CONFIG_FIELDS = (
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "logging_steps",
    "optim",
    "use_cpu",
    "torch_compile",
    "padding_free",
    "precompute_ref_log_probs",
    "dataloader_num_workers",
    "seed",
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _CountingCollator:
    """Wraps a collator and queues each batch's processed and padded token counts."""

    def __init__(self, inner: Any, queue: deque[tuple[int, int]]) -> None:
        self.inner = inner
        self.queue = queue

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        mask = batch["attention_mask"]
        self.queue.append((int(mask.sum()), int(mask.numel())))
        return batch


def _instrument(trainer: Any, steps: list[dict[str, float]]) -> None:
    """Count tokens per batch and time every optimizer step (wall and process CPU)."""
    from transformers import TrainerCallback

    queue: deque[tuple[int, int]] = deque()
    trainer.data_collator = _CountingCollator(trainer.data_collator, queue)

    class _StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.c0 = time.monotonic(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            wall, cpu = time.monotonic() - self.t0, time.process_time() - self.c0
            tokens = padded = 0
            for _ in range(args.gradient_accumulation_steps):
                if queue:
                    t, p = queue.popleft()
                    tokens, padded = tokens + t, padded + p
            steps.append({"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "padded": padded})
            logger.info(
                "step %d: %.1f s wall, %.1f CPU-s, %d tokens (%d padded)",
                state.global_step,
                wall,
                cpu,
                tokens,
                padded,
            )

    trainer.add_callback(_StepTimer())


def _config_summary(args: Any) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in CONFIG_FIELDS}


def _worker_ours(opts: argparse.Namespace, data: Any, steps: list[dict[str, float]]) -> dict:
    import trainer.training as training
    from trainer import TrainSpec, train

    seen: dict[str, Any] = {}
    make = training._make_trainer

    def make_instrumented(method: str, kwargs: dict[str, Any], reward: Any) -> Any:
        tr = make(method, kwargs, reward)
        _instrument(tr, steps)
        seen["config"] = _config_summary(tr.args)
        seen["setup_done"] = time.monotonic()
        return tr

    training._make_trainer = make_instrumented  # the bench's only hook into train()
    spec = TrainSpec(
        base_model=opts.base,
        data=data,
        output_dir=Path(tempfile.mkdtemp(prefix="tuneloop-tput-")),
        data_dir=Path(opts.data_dir),
        method="dpo",
        max_steps=opts.steps,
        batch_size=opts.batch_size,
        rank=opts.rank,
    )
    result = train(spec)
    return {"config": seen["config"], "setup_done": seen["setup_done"], "steps": result.steps}


def _worker_trl(
    opts: argparse.Namespace, data: Any, steps: list[dict[str, float]], fp32: bool
) -> dict:
    # A plain TRL script: TRL's defaults for everything we do not have to set.
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trainer import resolve_base_model

    path = str(resolve_base_model(opts.base, data_dir=Path(opts.data_dir)))  # only to find it
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    extra: dict[str, Any] = {"bf16": False} if fp32 else {}
    import torch

    if not torch.cuda.is_available():
        # Without it TRL's default bf16=True stops the script: "Your setup doesn't support
        # bf16/gpu. You need to assign use_cpu if you want to train the model on CPU."
        extra["use_cpu"] = True
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="tuneloop-tput-trl-"),
        per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps,
        report_to="none",
        **extra,
    )
    lora = LoraConfig(r=opts.rank, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = [p.to_trl() for p in data.pairs_train]
    tr = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    _instrument(tr, steps)
    setup_done = time.monotonic()
    tr.train()
    return {
        "config": _config_summary(tr.args),
        "setup_done": setup_done,
        "steps": tr.state.global_step,
    }


def worker(opts: argparse.Namespace) -> int:
    """Run one variant in this process and write its measurements to ``opts.worker_out``."""
    from trainer import load_compiled

    t0, c0 = time.monotonic(), time.process_time()
    data = load_compiled(Path(opts.data))
    steps: list[dict[str, float]] = []
    if opts.worker == "ours":
        info = _worker_ours(opts, data, steps)
    else:
        info = _worker_trl(opts, data, steps, fp32=opts.worker == "trl-fp32")
    total_wall, total_cpu = time.monotonic() - t0, time.process_time() - c0
    import torch

    out = {
        "variant": opts.worker,
        "torch_threads": torch.get_num_threads(),
        "pairs": len(data.pairs_train),
        "setup_s": round(info["setup_done"] - t0, 1),
        "total_wall_s": round(total_wall, 1),
        "total_cpu_s": round(total_cpu, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "config": info["config"],
        "steps": steps,
    }
    Path(opts.worker_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _summarize(run: dict[str, Any]) -> dict[str, Any]:
    steps = run["steps"]
    steady = steps[1:] or steps  # the first step warms up (allocations, lazy init)

    def total(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows)

    wall, cpu, tokens = total(steady, "wall_s"), total(steady, "cpu_s"), total(steady, "tokens")
    return {
        "steps_run": len(steps),
        "steps_measured": len(steady),
        "first_step_wall_s": round(steps[0]["wall_s"], 2) if steps else None,
        "median_step_wall_s": round(statistics.median(r["wall_s"] for r in steady), 2),
        "median_step_cpu_s": round(statistics.median(r["cpu_s"] for r in steady), 2),
        "tokens_per_step": round(tokens / len(steady), 1),
        "padded_per_step": round(total(steady, "padded") / len(steady), 1),
        "tokens_per_s": round(tokens / wall, 2),
        "tokens_per_cpu_s": round(tokens / cpu, 2),
        "all_steps_tokens_per_s": round(total(steps, "tokens") / total(steps, "wall_s"), 2),
    }


def _sample_dataset(opts: argparse.Namespace, out: Path) -> None:
    """Build a small paired dataset (concise tenant, several sampled answers per question)."""
    from trainer import (
        DEMO_PROMPTS,
        PERSONAS,
        collect_feedback,
        compile_feedback,
        generate_answers,
        load_base_model,
        write_jsonl,
    )

    model, tokenizer = load_base_model(opts.base, data_dir=Path(opts.data_dir))
    prompts = list(DEMO_PROMPTS[:16])
    answers: list[list[str]] = [[] for _ in prompts]
    for h, hint in enumerate(("", " Answer in one short sentence.")):
        convs = [[{"role": "user", "content": p + hint}] for p in prompts]
        got = generate_answers(
            model, tokenizer, convs, num_answers=2, max_new_tokens=160, temperature=0.8, seed=h
        )
        for i, options in enumerate(got):
            answers[i].extend(options)
    records = collect_feedback(PERSONAS["concise"], prompts, answers)
    write_jsonl(compile_feedback(records, holdout_fraction=0.0, min_records=4), out)


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"DPO LoRA throughput on {result['base_model']} ({result['pairs']} pairs, "
        f"batch {result['batch_size']}, rank {result['rank']}, all-linear)",
        "variant      bf16   GC    max_len steps first s  med s/step  med CPU-s  tok/step"
        "  tok/s  tok/CPU-s  RSS MB  vs TRL default",
    ]
    base = result["variants"].get("trl-default", {}).get("summary", {})
    for name, v in result["variants"].items():
        if "error" in v:
            lines.append(f"{name:<12} error: {v['error']}")
            continue
        s, c = v["summary"], v["config"]
        ratio = (
            f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x wall, "
            f"{s['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x CPU"
            if base
            else "-"
        )
        lines.append(
            f"{name:<12} {c['bf16']!s:<6} {c['gradient_checkpointing']!s:<5} "
            f"{c['max_length']!s:>7} {s['steps_run']:>5} {s['first_step_wall_s']:>7.1f} "
            f"{s['median_step_wall_s']:>11.2f} {s['median_step_cpu_s']:>10.2f} "
            f"{s['tokens_per_step']:>9.0f} {s['tokens_per_s']:>6.1f} "
            f"{s['tokens_per_cpu_s']:>10.1f} "
            f"{v['peak_rss_mb']:>7.0f}  {ratio}"
        )
    lines.append(
        "tok/s = processed (non-padding) tokens per wall second over steps 2..n; "
        "tok/CPU-s the same per process CPU-second"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("TUNELOOP_DATA_DIR", ".tuneloop"))
    parser.add_argument(
        "--data",
        default=str(RESULTS / "data" / "concise"),
        help="a compiled dataset directory (sampled from the base model if missing)",
    )
    parser.add_argument("--steps", type=int, default=6, help="steps for ours and trl-fp32")
    parser.add_argument("--trl-default-steps", type=int, default=2, help="bf16 steps are slow")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(RESULTS / "trainer_throughput.json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if opts.worker:
        return worker(opts)

    data = Path(opts.data)
    if not (data / "data_card.json").is_file():
        logger.info("no compiled dataset at %s: sampling one from %s", data, opts.base)
        _sample_dataset(opts, data)
    from trainer import load_compiled

    pairs = len(load_compiled(data).pairs_train)
    started, variants = time.monotonic(), {}
    for name in opts.variants.split(","):
        steps = opts.trl_default_steps if name == "trl-default" else opts.steps
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--worker-out",
                tmp.name,
                "--base",
                opts.base,
                "--data-dir",
                opts.data_dir,
                "--data",
                str(data),
                "--steps",
                str(steps),
                "--batch-size",
                str(opts.batch_size),
                "--rank",
                str(opts.rank),
            ]
            logger.info("running %s (%d steps)", name, steps)
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0:
                variants[name] = {"error": f"worker exited with {proc.returncode}"}
                continue
            run = json.loads(Path(tmp.name).read_text())
        run["summary"] = _summarize(run)
        variants[name] = run
    result = {
        "benchmark": "trainer_throughput",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": opts.base,
        "data": str(data),
        "pairs": pairs,
        "batch_size": opts.batch_size,
        "rank": opts.rank,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_end": os.getloadavg(),
        },
        "load_average_at_end": os.getloadavg(),
        "total_s": round(time.monotonic() - started, 1),
        "variants": variants,
    }
    base = variants.get("trl-default", {}).get("summary")
    ours = variants.get("ours", {}).get("summary")
    if base and ours:
        result["ours_vs_trl_default"] = {
            "tokens_per_s": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
            "tokens_per_cpu_s": round(ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2),
        }
    print(_table(result))  # a benchmark script's output is its table
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
