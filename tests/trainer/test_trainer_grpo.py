"""GRPO rewarded by the tenant's own thumbs judge, on the tiny model: the method rule, the
fallback when the judge may not reward, heartbeats and cancellation in every phase, a retry that
reuses the judge and resumes. (A reward-hacking GRPO candidate refused by the gate needs a model
that can answer: ``test_trainer_smollm2.py``.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import short_or_long
from trainer import (
    CompiledDataset,
    FeedbackRecord,
    InvalidSpec,
    TrainingCancelled,
    TrainSpec,
    compile_feedback,
    evaluate,
    train,
)
from trainer.judge import JudgeQuality
from trainer.rewards import answer_check
from trainer.stats import Estimate
from trainer.training import plan_method


def logs(seed: int, *, n: int = 80, coin_flips: bool = False) -> CompiledDataset:
    """One answer per distinct question, rated: users like short answers (or flip a coin)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        short = i % 2 == 0
        liked = rng.random() < 0.5 if coin_flips else short
        records.append(
            FeedbackRecord(
                messages=[{"role": "user", "content": f"question {seed}-{i}: fix thing {i % 13}?"}],
                completion=short_or_long(rng, short=short),
                rating=1 if liked else -1,
                user_id=f"user-{i % 5}",
            )
        )
    return compile_feedback(records)


@pytest.fixture(scope="module")
def tastes() -> CompiledDataset:
    return logs(1)


def _spec(data_dir: Path, out: Path, data: CompiledDataset, **kw: object) -> TrainSpec:
    defaults: dict[str, object] = {
        "base_model": "tiny-random",
        "data": data,
        "output_dir": out,
        "data_dir": data_dir,
        "method": "grpo",
        "max_steps": 3,
        "rank": 4,
        "learning_rate": 5e-4,
        "max_completion_length": 8,
    }
    return TrainSpec(**(defaults | kw))  # type: ignore[arg-type]


def _quality(trusted: bool) -> JudgeQuality:
    return JudgeQuality(
        trusted, "judge AUROC 0.80 [0.70, 0.90] (n=80)", Estimate(0.8, 0.7, 0.9, 80)
    )


def test_the_method_rule(tmp_path: Path, tastes: CompiledDataset) -> None:
    questions = len(tastes.grpo_train)
    spec = _spec(tmp_path, tmp_path, tastes, method="auto", grpo_min_questions=questions)
    method, why = plan_method(spec, tastes, _quality(True))
    assert method == "grpo" and why.startswith("auto chose GRPO") and str(questions) in why
    method, why = plan_method(spec, tastes, _quality(False))
    assert method == "kto" and "not GRPO: judge AUROC" in why
    fewer = _spec(tmp_path, tmp_path, tastes, method="auto", grpo_min_questions=questions + 1)
    method, why = plan_method(fewer, tastes, _quality(True))
    assert method == "kto" and f"{questions} distinct training questions" in why
    asked = _spec(tmp_path, tmp_path, tastes)
    method, why = plan_method(asked, tastes, _quality(False))
    assert method == "kto" and why.startswith("GRPO fell back to KTO")
    assert plan_method(asked, tastes, None, reward_given=True)[0] == "grpo"


def test_grpo_is_rewarded_by_the_tenant_judge(
    data_dir: Path, tmp_path: Path, tastes: CompiledDataset
) -> None:
    phases: list[tuple[str, int, int]] = []
    result = train(
        _spec(data_dir, tmp_path, tastes),
        phase=lambda name, done, total: phases.append((name, done, total)) and None,
    )
    assert result.method == "grpo" and result.steps == 3
    assert result.metrics["method_reason"].startswith("GRPO, as asked, rewarded by the tenant's")
    assert result.metrics["judge"]["trusted"] and not result.metrics["judge_reused"]
    judge_file = tmp_path / "judge.json"
    fitted = judge_file.read_bytes(), judge_file.stat().st_mtime_ns
    # The evaluation reads the judge training fitted instead of fitting it again.
    report = evaluate(
        base_model="tiny-random",
        candidate=result.adapter_dir,
        data=tastes,
        data_dir=data_dir,
        judge_out=tmp_path,
        win_rate=False,
        capability=False,
        max_regression_prompts=2,
    )
    assert report.judge == result.metrics["judge"]
    assert (judge_file.read_bytes(), judge_file.stat().st_mtime_ns) == fitted
    # Trained to please that judge: its win rate is not independent evidence for the gate.
    assert result.metrics["reward"] == "tenant_judge" and report.judge_was_reward
    # Heartbeats while the judge reads the thumbs, then after every scored group.
    judged = len(tastes.kto_train) + len(tastes.kto_holdout)
    assert ("judge", judged, judged) in phases
    assert [done for name, done, _ in phases if name == "generation"] == [0, 1, 2]
    # Every logged step carries what the run page plots.
    for row in result.history:
        for key in ("reward", "reward_std", "kl", "completions/mean_length"):
            assert key in row, (key, row)
        assert 0.0 <= row["frac_reward_zero_std"] <= 1.0
        assert "rewards/judge/mean" in row and "rewards/answer_check/mean" in row
    # Metered: the sampled groups' tokens and what the judge read.
    assert result.metrics["judge_tokens"] > 0
    assert result.metrics["tokens"] > result.metrics["judge_tokens"]


def test_grpo_falls_back_when_the_judge_is_not_trusted(data_dir: Path, tmp_path: Path) -> None:
    result = train(_spec(data_dir, tmp_path, logs(2, coin_flips=True)))
    assert result.method == "kto"
    assert result.metrics["method_reason"].startswith("GRPO fell back to KTO")
    assert not result.metrics["judge"]["trusted"]
    assert "tokens" not in result.metrics  # a KTO run is metered on its rows


def test_cancel_while_fitting_the_judge(
    data_dir: Path, tmp_path: Path, tastes: CompiledDataset
) -> None:
    with pytest.raises(TrainingCancelled) as info:
        train(_spec(data_dir, tmp_path, tastes), phase=lambda name, done, _: done == 0)
    assert info.value.step == 0 and "judge" in str(info.value)
    assert not (tmp_path / "adapter").exists()


def test_cancel_during_generation_checkpoints_and_a_retry_resumes_with_the_same_judge(
    data_dir: Path, tmp_path: Path, tastes: CompiledDataset
) -> None:
    spec = _spec(data_dir, tmp_path, tastes, max_steps=6, checkpoint_every=2, resume=True)

    def stop_in_step_three(name: str, done: int, total: int) -> bool:
        return not (name == "generation" and done == 2)

    with pytest.raises(TrainingCancelled) as info:
        train(spec, phase=stop_in_step_three)
    assert info.value.step == 3
    judge_file = (tmp_path / "judge.json").read_text()
    resumed = train(spec)
    assert resumed.steps == 6 and resumed.metrics["judge_reused"]
    assert resumed.metrics["resumed_from"].endswith("checkpoint-3")
    assert (tmp_path / "judge.json").read_text() == judge_file


def test_the_answer_check_pays_for_answers_only() -> None:
    answers = ["Use a wrench.", "", " ... ", "yes yes yes yes", "the the the cat the the"]
    assert answer_check([None] * 5, answers) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # Declining or saying one is unsure is an answer; whether users like it is the judge's call.
    assert answer_check([None] * 2, ["I can't help with that.", "I'm not sure."]) == [1.0, 1.0]


def test_a_fallback_is_checked_for_the_method_it_falls_back_to(
    data_dir: Path, tmp_path: Path
) -> None:
    # Valid for GRPO (one question a step), not for KTO (its KL term needs a batch).
    with pytest.raises(InvalidSpec, match="KTO estimates its KL term"):
        train(_spec(data_dir, tmp_path, logs(2, coin_flips=True), batch_size=1))


def test_a_retry_never_resumes_another_methods_checkpoint(
    data_dir: Path, tmp_path: Path, tastes: CompiledDataset
) -> None:
    kto = _spec(data_dir, tmp_path, tastes, method="kto", max_steps=4, checkpoint_every=2)
    with pytest.raises(TrainingCancelled):
        train(kto, progress=lambda p: p.step < 2)
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    grpo = train(_spec(data_dir, tmp_path, tastes, max_steps=2, resume=True))
    assert grpo.method == "grpo" and grpo.metrics["resumed_from"] is None
