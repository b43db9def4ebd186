"""Evaluation (preference accuracy, win rate, regression) and the promotion gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer import (
    CompiledDataset,
    CorruptAdapter,
    EvalReport,
    GatePolicy,
    InvalidSpec,
    TrainResult,
    TrainSpec,
    evaluate,
    gate,
    train,
    verify_adapter,
)
from trainer.evaluation import regression_prompts


@pytest.fixture(scope="module")
def dpo_adapter(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, compiled: CompiledDataset
) -> TrainResult:
    out = tmp_path_factory.mktemp("dpo")
    spec = TrainSpec(
        base_model="tiny-random",
        data=compiled,
        output_dir=out,
        data_dir=data_dir,
        method="dpo",
        max_steps=8,
        learning_rate=5e-4,
        rank=8,
    )
    return train(spec)


def test_shared_regression_set_ships_with_the_package() -> None:
    rows = regression_prompts()
    assert len(rows) >= 30
    assert all(r["messages"][-1]["role"] == "user" and r["reference"] for r in rows)


def test_trained_candidate_beats_base_on_held_out_preferences(
    data_dir: Path, compiled: CompiledDataset, dpo_adapter: TrainResult
) -> None:
    report = evaluate(
        base_model="tiny-random",
        candidate=dpo_adapter.adapter_dir,
        data=compiled,
        data_dir=data_dir,
        max_regression_prompts=10,
    )
    assert report.n_holdout_pairs == len(compiled.pairs_holdout) > 0
    assert report.current == "base"
    assert report.pref_accuracy_current == 0.5  # base vs itself: every pair is a tie
    assert report.pref_accuracy_candidate == 1.0
    assert report.pref_improvement == pytest.approx(0.5)
    assert report.win_rate is None  # no judge given
    assert report.n_regression_prompts == 10
    assert report.regression_kl is not None and report.regression_kl >= 0.0
    assert report.regression_ppl_increase is not None
    json.dumps(report.to_dict())  # JSON-serializable as is
    assert EvalReport.from_dict(report.to_dict()) == report
    decision = gate(report, GatePolicy())
    assert decision.promote, decision.reason


def test_candidate_equal_to_current_shows_no_improvement(
    data_dir: Path, compiled: CompiledDataset, dpo_adapter: TrainResult
) -> None:
    judged: list[str] = []

    def judge(messages: object, answer: str) -> float:
        judged.append(answer)
        return float(len(answer))

    report = evaluate(
        base_model="tiny-random",
        candidate=dpo_adapter.adapter_dir,
        current=dpo_adapter.adapter_dir,
        data=compiled,
        data_dir=data_dir,
        judge=judge,
        max_win_prompts=4,
        max_new_tokens=8,
        max_regression_prompts=2,
    )
    assert report.pref_improvement == 0.0
    n = min(4, len(compiled.grpo_holdout))
    assert report.n_win_prompts == n and len(judged) == 2 * n
    assert report.ties == n and report.win_rate == 0.5  # same weights, same greedy answers
    decision = gate(report, GatePolicy(min_pref_improvement=0.05))
    assert not decision.promote
    assert decision.checks["preference"] is False
    assert "reject" in decision.reason and "preference" in decision.reason


def _report(**kw: object) -> EvalReport:
    base: dict[str, object] = {
        "candidate": "c",
        "current": "base",
        "n_holdout_pairs": 10,
        "pref_accuracy_candidate": 0.8,
        "pref_accuracy_current": 0.5,
        "pref_improvement": 0.3,
        "win_rate": 0.7,
        "regression_kl": 0.05,
        "regression_ppl_increase": 0.02,
    }
    base.update(kw)
    return EvalReport(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("report_kw", "policy_kw", "promote", "failed"),
    [
        ({}, {}, True, None),
        ({"pref_improvement": 0.01, "pref_accuracy_candidate": 0.51}, {}, False, "preference"),
        ({"pref_improvement": None}, {}, False, "preference"),
        ({"regression_kl": 0.9}, {}, False, "regression_kl"),
        ({"regression_ppl_increase": 0.5}, {}, False, "regression_ppl"),
        ({"win_rate": 0.4}, {"min_win_rate": 0.5}, False, "win_rate"),
        ({"win_rate": None}, {"min_win_rate": 0.5}, False, "win_rate"),
        ({"win_rate": None}, {}, True, None),  # win rate not required by default
        ({"regression_kl": 0.9}, {"max_regression_kl": None}, True, None),
        ({"pref_improvement": 0.05}, {"min_pref_improvement": 0.05}, True, None),  # boundary
    ],
)
def test_gate_decisions(
    report_kw: dict[str, object], policy_kw: dict[str, object], promote: bool, failed: str | None
) -> None:
    decision = gate(_report(**report_kw), GatePolicy(**policy_kw))  # type: ignore[arg-type]
    assert decision.promote is promote, decision.reason
    if failed:
        assert decision.checks[failed] is False
        assert decision.reason.startswith("reject") and failed in decision.reason
    else:
        assert decision.reason.startswith("promote")


def test_gate_policy_validation() -> None:
    with pytest.raises(InvalidSpec):
        GatePolicy(min_win_rate=1.5)
    with pytest.raises(InvalidSpec):
        GatePolicy(max_regression_kl=-1)


def _copy(adapter: Path, dest: Path) -> Path:
    shutil.copytree(adapter, dest)
    return dest


def test_corrupt_adapters_are_typed_errors(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset, dpo_adapter: TrainResult
) -> None:
    good = dpo_adapter.adapter_dir
    verify_adapter(good, expected_sha256=dpo_adapter.weights_sha256)

    missing = _copy(good, tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    garbage = _copy(good, tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file")
    bad_config = _copy(good, tmp_path / "bad-config")
    (bad_config / "adapter_config.json").write_text("{oops")
    for broken in (missing, garbage, bad_config):
        with pytest.raises(CorruptAdapter) as info:
            evaluate(base_model="tiny-random", candidate=broken, data=compiled, data_dir=data_dir)
        assert info.value.code == "corrupt_adapter"
    with pytest.raises(CorruptAdapter, match="sha256"):
        verify_adapter(good, expected_sha256="0" * 64)
    with pytest.raises(CorruptAdapter):
        verify_adapter(tmp_path / "does-not-exist")


def test_regression_scores_the_answer_text_not_the_end_of_turn(data_dir: Path) -> None:
    # A "detailed" tenant's adapter makes the model stop later; scoring the template's end-of-turn
    # token would report that as forgetting. Only the reference's own tokens are scored.
    from trainer.base_models import load_base_model
    from trainer.generation import _closing_length, _encode_pairs

    _, tokenizer = load_base_model("tiny-random", data_dir=data_dir)
    messages = [{"role": "user", "content": "What does a thermometer measure?"}]
    answer = "A thermometer measures temperature."
    closing = _closing_length(tokenizer, messages)
    ids, start = _encode_pairs(tokenizer, [(messages, answer)], 512)[0]
    assert closing > 0
    assert tokenizer.decode(ids[start : len(ids) - closing]).strip() == answer
    assert "im_end" in tokenizer.decode(ids[len(ids) - closing :])
