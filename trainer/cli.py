"""``tuneloop train`` / ``tuneloop eval``: the trainer on files, without the platform around it.

Both are plain functions with typer annotations; register them with
``app.command("train")(trainer.cli.train)``. Results go to stdout as JSON, progress to stderr,
and a trainer error ends the command with a one-line message and exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from trainer.compiler import HOLDOUT_FRACTION
from trainer.errors import InvalidSpec, TrainerError

__all__ = ["eval", "train"]

logger = logging.getLogger(__name__)

DataDirOption = Annotated[
    Path,
    typer.Option(
        envvar="TUNELOOP_DATA_DIR",
        help="Data directory; converted base models live in <data-dir>/models.",
    ),
]
BaseOption = Annotated[
    str,
    typer.Option(help="Base model: smollm2-135m-instruct, tiny-random, or a local HF directory."),
]


@contextmanager
def _trainer_errors() -> Iterator[None]:
    try:
        yield
    except TrainerError as exc:
        typer.echo(f"error [{exc.code}]: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _emit(payload: dict[str, Any]) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))


def train(
    feedback: Annotated[
        Path,
        typer.Option(help="Feedback JSONL file, one rated answer per line (see the docstring)."),
    ],
    out: Annotated[Path, typer.Option(help="Run directory: dataset/, adapter/, checkpoints/.")],
    base: BaseOption = "smollm2-135m-instruct",
    method: Annotated[str, typer.Option(help="auto, dpo, kto or grpo.")] = "auto",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: epochs).")] = None,
    epochs: Annotated[
        float, typer.Option(help="Passes over the data when --steps is unset.")
    ] = 2.0,
    rank: Annotated[int, typer.Option(help="LoRA rank (at most 64).")] = 16,
    learning_rate: Annotated[float, typer.Option(help="LoRA learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per optimizer step.")] = 4,
    beta: Annotated[float, typer.Option(help="DPO/KTO beta; GRPO KL coefficient.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Save a resumable checkpoint every N steps.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in --out.")
    ] = False,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of prompts held out for evaluation.")
    ] = HOLDOUT_FRACTION,
    min_records: Annotated[
        int, typer.Option(help="Fewest distinct rated answers to train on.")
    ] = 8,
    data_dir: DataDirOption = Path(".tuneloop"),
) -> None:
    """Compile a feedback file and train a LoRA adapter on it; print a JSON summary.

    The feedback file holds one JSON object per line, for example::

        {"messages": [{"role": "user", "content": "How do I reset my password?"}],
         "completion": "Open Settings, then Security, then Reset.", "rating": "up",
         "correction": null, "user_id": "u1", "created_at": "2025-01-31T12:00:00+00:00"}

    ``messages`` may be replaced by ``"prompt": "<user text>"``; ``rating`` is ``up``/``down``
    or ``1``/``-1``; ``correction``, ``user_id`` and ``created_at`` are optional. PII is
    scrubbed before anything is written. The compiled dataset goes to ``OUT/dataset`` and the
    adapter (``adapter_config.json``, ``adapter_model.safetensors``, ``metrics.json``) to
    ``OUT/adapter``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from trainer.compiler import compile_feedback, read_feedback_jsonl, write_jsonl
    from trainer.training import TrainProgress, TrainSpec
    from trainer.training import train as run_training

    with _trainer_errors():
        if method not in ("auto", "dpo", "kto", "grpo"):
            raise InvalidSpec(f"--method must be auto, dpo, kto or grpo, got {method!r}")
        if not feedback.is_file():
            raise InvalidSpec(f"--feedback {feedback} is not a file")
        records = read_feedback_jsonl(feedback)
        dataset = compile_feedback(
            records, holdout_fraction=holdout_fraction, min_records=min_records
        )
        write_jsonl(dataset, out / "dataset")
        spec = TrainSpec(
            base_model=base,
            data=dataset,
            output_dir=out,
            data_dir=data_dir,
            method=method,  # type: ignore[arg-type]  # checked above
            rank=rank,
            learning_rate=learning_rate,
            max_steps=steps,
            epochs=epochs,
            batch_size=batch_size,
            beta=beta,
            seed=seed,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
        console = Console(stderr=True)
        with Progress(
            TextColumn("[bold]training[/bold] {task.description}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=console,
            transient=not sys.stderr.isatty(),
        ) as bar:
            task = bar.add_task(base, total=None, loss="-")

            def on_progress(p: TrainProgress) -> None:
                loss = "-" if p.loss is None else f"{p.loss:.4f}"
                bar.update(task, completed=p.step, total=p.total_steps, loss=loss)

            result = run_training(spec, progress=on_progress)
        _emit(
            {
                "adapter_dir": str(result.adapter_dir),
                "weights_sha256": result.weights_sha256,
                "method": result.method,
                "base_model": result.base_model,
                "steps": result.steps,
                "num_examples": result.num_examples,
                "train_runtime_s": result.train_runtime_s,
                "train_loss": result.metrics.get("train_loss"),
                "final_metrics": result.metrics.get("final", {}),
                "data_card": dataset.card.to_dict(),
            }
        )


def eval(  # the command is called "eval"; shadowing the builtin here is intended
    adapter: Annotated[Path, typer.Option(help="Candidate adapter directory.")],
    feedback: Annotated[
        Path,
        typer.Option(
            help="Feedback JSONL (compiled with the same holdout split as training) "
            "or a compiled dataset directory."
        ),
    ],
    base: BaseOption = "smollm2-135m-instruct",
    current: Annotated[
        Path | None, typer.Option(help="Current adapter to compare with (default: base).")
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            help="A simulated-user persona as the judge (default: the thumbs judge learned from "
            "the feedback's train split)."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per judged answer.")] = 96,
    max_win_prompts: Annotated[int, typer.Option(help="Held-out prompts to judge.")] = 64,
    min_pref_improvement: Annotated[
        float, typer.Option(help="Gate: least tenant-metric gain at the interval's low end.")
    ] = 0.0,
    min_win_rate: Annotated[
        float, typer.Option(help="Gate: least win rate at the interval's low end.")
    ] = 0.5,
    min_judge_auroc: Annotated[
        float, typer.Option(help="The judge decides only from this held-out AUROC on.")
    ] = 0.65,
    max_capability_drop: Annotated[
        float, typer.Option(help="Gate: largest capability pass-rate drop (upper bound).")
    ] = 0.05,
    max_regression_kl: Annotated[float, typer.Option(help="Gate: largest regression KL.")] = 0.5,
    max_capability_tasks: Annotated[
        int | None, typer.Option(help="Run only the first N capability tasks (default: all).")
    ] = None,
    holdout_fraction: Annotated[
        float, typer.Option(help="Holdout share used when compiling a feedback file.")
    ] = HOLDOUT_FRACTION,
    data_dir: DataDirOption = Path(".tuneloop"),
) -> None:
    """Evaluate an adapter against the current one (or base); print the report and gate decision."""
    from trainer.compiler import compile_feedback, load_compiled, read_feedback_jsonl
    from trainer.evaluation import evaluate
    from trainer.gate import GatePolicy, gate
    from trainer.simulated_users import PERSONAS

    with _trainer_errors():
        if judge is not None and judge not in PERSONAS:
            raise InvalidSpec(f"--judge must be one of {', '.join(PERSONAS)}, got {judge!r}")
        policy = GatePolicy(
            min_pref_improvement=min_pref_improvement,
            min_win_rate=min_win_rate,
            max_capability_drop=max_capability_drop,
            max_regression_kl=max_regression_kl,
        )
        if feedback.is_dir():
            dataset = load_compiled(feedback)
        elif feedback.is_file():
            dataset = compile_feedback(
                read_feedback_jsonl(feedback), holdout_fraction=holdout_fraction, min_records=1
            )
        else:
            raise InvalidSpec(f"--feedback {feedback} is neither a file nor a dataset directory")
        report = evaluate(
            base_model=base,
            candidate=adapter,
            current=current,
            data=dataset,
            data_dir=data_dir,
            judge=PERSONAS[judge].judge if judge else None,
            min_judge_auroc=min_judge_auroc,
            max_new_tokens=max_new_tokens,
            max_capability_tasks=max_capability_tasks,
            max_win_prompts=max_win_prompts,
        )
        decision = gate(report, policy)
        _emit(
            {
                "report": report.to_dict(),
                "gate": {
                    "promote": decision.promote,
                    "reason": decision.reason,
                    "checks": decision.checks,
                },
            }
        )
