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
    phases: list[str] = []
    report = evaluate(
        base_model="tiny-random",
        candidate=dpo_adapter.adapter_dir,
        data=compiled,
        data_dir=data_dir,
        max_new_tokens=16,
        max_capability_tasks=12,
        max_regression_prompts=10,
        progress=phases.append,
    )
    starts = [p for p in phases if " " not in p]
    assert starts == ["tenant_metric", "judge", "win_rate", "capability", "drift"]
    # Within the long phases, one report per batch of generation (the activity heartbeats).
    assert "capability 12/12" in phases and any(p.startswith("win_rate ") for p in phases)
    assert report.n_holdout_pairs == len(compiled.pairs_holdout) >= 8
    assert report.tenant_metric == "pairs" and report.current == "base"
    assert report.pref_accuracy_current == 0.5  # base vs itself: every pair is a tie
    assert report.pref_accuracy_candidate == 1.0
    assert report.pref_improvement == pytest.approx(0.5)
    cand = report.interval("pref_accuracy_candidate")
    assert cand is not None and cand.n == report.n_holdout_pairs and cand.low < 1.0
    assert report.pref_improvement_low == pytest.approx(cand.low - 0.5, abs=1e-3)
    # The thumbs judge learned the constant good/bad answers and may decide.
    assert report.judge is not None and report.judge["auroc"]["value"] == 1.0
    assert report.judge_trusted and report.win_rate is not None
    assert not report.judge_was_reward  # DPO learned from the thumbs, not from the judge
    assert report.n_win_prompts == len(compiled.grpo_holdout)
    assert report.wins + report.ties + report.losses == report.n_win_prompts
    assert report.interval("win_rate") is not None and len(report.samples) >= 3
    assert report.n_capability == 12 and report.capability_drop is not None
    assert report.n_regression_prompts == 10
    assert report.regression_kl is not None and report.regression_kl >= 0.0
    assert report.regression_ppl_increase is not None
    json.dumps(report.to_dict())  # JSON-serializable as is
    assert EvalReport.from_dict(report.to_dict()) == report
    decision = gate(report, GatePolicy(min_win_rate=None))
    assert decision.checks["preference"], decision.reason


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
        max_win_prompts=8,
        max_new_tokens=8,
        capability=False,
        max_regression_prompts=2,
    )
    assert report.pref_improvement == 0.0
    assert report.n_win_prompts == 8 and len(judged) == 16
    assert report.ties == 8 and report.win_rate == 0.5  # same weights, same greedy answers
    decision = gate(report, GatePolicy(max_capability_drop=None))
    assert not decision.promote
    assert decision.checks["preference"] is False and decision.checks["win_rate"] is False
    assert "reject" in decision.reason and "preference" in decision.reason


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
