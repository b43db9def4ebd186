"""``tuneloop train`` / ``tuneloop eval`` through typer's CliRunner on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import trainer.cli
from trainer import FeedbackRecord

Factory = Callable[..., list[FeedbackRecord]]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(trainer.cli.train)
    app.command("eval")(trainer.cli.eval)
    return app


def _write_feedback(path: Path, records: list[FeedbackRecord]) -> Path:
    with path.open("w") as fh:
        for r in records:
            rating = "up" if r.rating == 1 else "down"
            fh.write(
                json.dumps(
                    {
                        "messages": list(r.messages),
                        "completion": r.completion,
                        "rating": rating,
                        "user_id": r.user_id,
                    }
                )
                + "\n"
            )
    return path


def test_train_then_eval(
    app: typer.Typer, data_dir: Path, tmp_path: Path, records_factory: Factory
) -> None:
    feedback = _write_feedback(tmp_path / "fb.jsonl", records_factory(48))
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            "--feedback",
            str(feedback),
            "--out",
            str(tmp_path / "run"),
            "--base",
            "tiny-random",
            "--steps",
            "3",
            "--rank",
            "4",
            "--learning-rate",
            "5e-4",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "dpo" and summary["steps"] == 3
    adapter = Path(summary["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").is_file()
    assert summary["data_card"]["pairs_train"] > 0
    assert (tmp_path / "run" / "dataset" / "data_card.json").is_file()

    result = runner.invoke(
        app,
        [
            "eval",
            "--adapter",
            str(adapter),
            "--feedback",
            str(tmp_path / "run" / "dataset"),
            "--base",
            "tiny-random",
            "--judge",
            "concise",
            "--max-new-tokens",
            "4",
            "--max-win-prompts",
            "8",
            "--max-capability-tasks",
            "5",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["report"]["n_holdout_pairs"] > 0
    assert out["report"]["judge"]["reason"] == "a judge given to the evaluation"
    assert out["report"]["n_win_prompts"] in (0, 8)  # 0: fewer than 8 held-out questions
    assert out["report"]["n_capability"] == 5
    assert isinstance(out["gate"]["promote"], bool) and out["gate"]["reason"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--base", "no-such-model"], "unknown_base_model"),
        (["--rank", "128"], "invalid_spec"),
        (["--method", "sft"], "invalid_spec"),
    ],
)
def test_trainer_errors_are_one_line_exit_2(
    app: typer.Typer,
    data_dir: Path,
    tmp_path: Path,
    records_factory: Factory,
    args: list[str],
    code: str,
) -> None:
    feedback = _write_feedback(tmp_path / "fb.jsonl", records_factory(12))
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--feedback",
            str(feedback),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--data-dir",
            str(data_dir),
            *args,
        ],
    )
    assert result.exit_code == 2
    assert f"error [{code}]" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_one_sided_feedback_file(
    app: typer.Typer, data_dir: Path, tmp_path: Path, records_factory: Factory
) -> None:
    feedback = _write_feedback(tmp_path / "fb.jsonl", records_factory(12, down=False))
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--feedback",
            str(feedback),
            "--out",
            str(tmp_path / "run"),
            "--base",
            "tiny-random",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 2
    assert "error [one_sided_feedback]" in result.output


def test_bad_feedback_line(app: typer.Typer, data_dir: Path, tmp_path: Path) -> None:
    feedback = tmp_path / "fb.jsonl"
    feedback.write_text('{"prompt": "q", "completion": "a", "rating": "meh"}\n')
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--feedback",
            str(feedback),
            "--out",
            str(tmp_path / "run"),
            "--base",
            "tiny-random",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 2
    assert "error [invalid_feedback]" in result.output and "fb.jsonl:1" in result.output
