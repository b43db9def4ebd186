"""Real LoRA training runs on the tiny model: DPO, KTO, GRPO, reward model, resume, failures."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import (
    CompiledDataset,
    FeedbackRecord,
    InvalidSpec,
    NotEnoughData,
    TrainingCancelled,
    TrainingDiverged,
    TrainProgress,
    TrainSpec,
    compile_feedback,
    resolve_base_model,
    train,
    train_reward_model,
    write_jsonl,
)
from trainer._quiet import quiet_hf
from trainer.reward_model import load_reward_model
from trainer.training import build_configs, choose_method, sha256_file

Factory = Callable[..., list[FeedbackRecord]]


def _spec(data_dir: Path, out: Path, data: CompiledDataset | Path, **kw: object) -> TrainSpec:
    defaults: dict[str, object] = {
        "base_model": "tiny-random",
        "data": data,
        "output_dir": out,
        "data_dir": data_dir,
        "max_steps": 4,
        "learning_rate": 5e-4,
        "rank": 8,
    }
    defaults.update(kw)
    return TrainSpec(**defaults)  # type: ignore[arg-type]


def _lora(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_dpo_writes_a_plain_adapter_and_learns(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    seen: list[TrainProgress] = []
    result = train(
        _spec(data_dir, tmp_path, compiled, method="dpo", max_steps=6), progress=seen.append
    )
    assert result.method == "dpo" and result.steps == 6
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ]
    assert result.weights_sha256 == sha256_file(result.adapter_dir / "adapter_model.safetensors")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == "tiny-random"
    assert not (tmp_path / "checkpoints").exists()  # cleaned up after success
    # Progress after every step with a loss, and a final ETA of zero.
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6]
    assert all(p.total_steps == 6 and p.loss is not None for p in seen)
    assert seen[-1].eta_s == 0.0
    # DPO's implicit reward margin grows from 0 on this easy, consistent preference.
    assert seen[0].metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert seen[-1].metrics["rewards/margins"] > 0.05
    metrics = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert metrics["weights_sha256"] == result.weights_sha256
    assert metrics["data_content_hash"] == compiled.card.content_hash


def test_kto_trains_on_unpaired_thumbs(
    data_dir: Path, tmp_path: Path, records_factory: Factory
) -> None:
    # Ups and downs on different prompts: no pairs at all, so auto must pick KTO.
    recs = records_factory(16, down=False) + [
        FeedbackRecord([{"role": "user", "content": f"Other question {i}"}], "No. No idea.", -1)
        for i in range(10)
    ]
    data = compile_feedback(recs, holdout_fraction=0.0)
    assert not data.pairs_train
    seen: list[TrainProgress] = []
    result = train(_spec(data_dir, tmp_path, data, method="auto"), progress=seen.append)
    assert result.method == "kto"
    assert seen[-1].metrics["rewards/margins"] > seen[0].metrics["rewards/margins"]
    assert any(v.abs().sum() > 0 for k, v in _lora(result.adapter_dir).items() if "lora_B" in k)


def test_auto_picks_dpo_with_enough_pairs(compiled: CompiledDataset, tmp_path: Path) -> None:
    spec = TrainSpec(
        base_model="tiny-random", data=compiled, output_dir=tmp_path, data_dir=tmp_path
    )
    assert choose_method(spec, compiled) == "dpo"
    few = TrainSpec(
        base_model="tiny-random",
        data=compiled,
        output_dir=tmp_path,
        data_dir=tmp_path,
        min_pairs=10_000,
    )
    assert choose_method(few, compiled) == "kto"


def test_grpo_with_a_reward_function(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    calls: list[tuple[str, str]] = []

    def shorter_is_better(messages: object, answer: str) -> float:
        assert isinstance(messages, list) and messages[-1]["role"] == "user"
        calls.append((messages[-1]["content"], answer))
        return -len(answer) / 100

    result = train(
        _spec(
            data_dir,
            tmp_path,
            compiled,
            method="grpo",
            max_steps=2,
            batch_size=1,
            max_completion_length=16,
        ),
        reward_fn=shorter_is_better,
    )
    assert result.method == "grpo" and result.steps == 2
    # 2 steps x 1 prompt x 4 sampled answers, each scored by our function.
    assert len(calls) == 8
    assert "reward" in result.metrics["final"]
    # Not the tenant's judge: its win rate stays independent evidence for the gate.
    assert result.metrics["reward"] == "reward_fn"


def test_reward_model_ranks_chosen_above_rejected(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    rm = train_reward_model(
        base_model="tiny-random",
        data=compiled,
        output_dir=tmp_path / "rm",
        data_dir=data_dir,
        max_steps=12,
        learning_rate=1e-3,
    )
    assert sorted(p.name for p in rm.adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ]
    assert any("score" in k for k in _lora(rm.adapter_dir))  # the new head is saved too
    judge = load_reward_model(rm.adapter_dir, base_model="tiny-random", data_dir=data_dir)
    pairs = compiled.pairs_holdout
    assert pairs
    wins = sum(judge(p.prompt, p.chosen) > judge(p.prompt, p.rejected) for p in pairs)
    assert wins == len(pairs)


def test_grpo_with_a_given_reward_model(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    rm = train_reward_model(
        base_model="tiny-random",
        data=compiled,
        output_dir=tmp_path / "rm",
        data_dir=data_dir,
        max_steps=2,
    )
    result = train(
        _spec(
            data_dir,
            tmp_path / "run",
            compiled,
            method="grpo",
            max_steps=1,
            max_completion_length=8,
            reward_model=rm.adapter_dir,
        )
    )
    assert result.method == "grpo" and result.steps == 1
    assert result.metrics["method_reason"] == "GRPO, as asked, with the reward it was given"
    assert not (tmp_path / "run" / "judge.json").exists()  # no judge was needed


def test_resume_from_checkpoint_matches_an_uninterrupted_run(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    full = train(_spec(data_dir, tmp_path / "full", compiled, max_steps=6, checkpoint_every=3))

    def stop_after_three(p: TrainProgress) -> bool:
        return p.step < 3  # False at step 3: stop gracefully

    out = tmp_path / "interrupted"
    with pytest.raises(TrainingCancelled) as info:
        train(
            _spec(data_dir, out, compiled, max_steps=6, checkpoint_every=3),
            progress=stop_after_three,
        )
    assert info.value.step == 3 and info.value.code == "training_cancelled"
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    assert not (out / "adapter").exists()

    steps_seen: list[int] = []
    resumed = train(
        _spec(data_dir, out, compiled, max_steps=6, checkpoint_every=3, resume=True),
        progress=lambda p: steps_seen.append(p.step),
    )
    assert steps_seen == [4, 5, 6]  # it continued, it did not start over
    assert resumed.metrics["resumed_from"].endswith("checkpoint-3")
    a, b = _lora(full.adapter_dir), _lora(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

    # A retry after completion returns the finished adapter instead of training again.
    again = train(
        _spec(data_dir, out, compiled, max_steps=6, checkpoint_every=3, resume=True),
        progress=lambda p: pytest.fail("must not train again"),
    )
    assert again.weights_sha256 == resumed.weights_sha256

    # And the comparison can fail: a run that stopped at step 3 differs from the full run.
    short = train(_spec(data_dir, tmp_path / "short", compiled, max_steps=3))
    c = _lora(short.adapter_dir)
    assert any(not torch.allclose(a[k], c[k]) for k in a if "lora_B" in k)


def test_progress_callback_may_raise_to_cancel(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    def cancel(p: TrainProgress) -> None:
        if p.step == 2:
            raise TrainingCancelled("workflow cancelled", step=p.step)

    with pytest.raises(TrainingCancelled, match="workflow cancelled"):
        train(_spec(data_dir, tmp_path, compiled), progress=cancel)
    assert not (tmp_path / "adapter").exists()


def test_nan_loss_is_training_diverged(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(resolve_base_model("tiny-random", data_dir=data_dir), broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingDiverged) as info:
        train(_spec(data_dir, tmp_path / "run", compiled, base_model=str(broken)))
    assert info.value.code == "training_diverged"
    assert "learning rate" in str(info.value)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rank": 65}, "at most|between 1 and 64"),
        ({"rank": 0}, "between 1 and 64"),
        ({"method": "ppo"}, "method"),
        ({"learning_rate": 0.5}, "learning_rate"),
        ({"max_steps": 0}, "max_steps"),
        ({"method": "kto", "batch_size": 1}, "batch_size"),
        ({"target_modules": "everything"}, "target_modules"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
    ],
)
def test_invalid_specs_are_rejected(
    tmp_path: Path, compiled: CompiledDataset, overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidSpec, match=match):
        _spec(tmp_path, tmp_path, compiled, **overrides)


def test_dpo_without_pairs_is_not_enough_data(
    data_dir: Path, tmp_path: Path, records_factory: Factory
) -> None:
    recs = records_factory(10, down=False) + [
        FeedbackRecord([{"role": "user", "content": f"q{i}"}], "bad", -1) for i in range(10)
    ]
    data = compile_feedback(recs, holdout_fraction=0.0)
    with pytest.raises(NotEnoughData, match="DPO"):
        train(_spec(data_dir, tmp_path, data, method="dpo"))


def test_config_mapping_uses_cpu_settings(tmp_path: Path, compiled: CompiledDataset) -> None:
    spec = _spec(tmp_path, tmp_path, compiled, method="kto", checkpoint_every=5)
    with quiet_hf():
        args, lora = build_configs(spec, "kto", compiled)
    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16
    assert args.gradient_checkpointing is False
    assert args.report_to in ([], "none", ["none"])
    assert args.save_steps == 5 and args.save_strategy == "steps"
    assert args.desirable_weight == compiled.desirable_weight
    assert lora.r == 8 and lora.target_modules == "all-linear"
    with quiet_hf():
        grpo_args, _ = build_configs(
            _spec(tmp_path, tmp_path, compiled, batch_size=6), "grpo", compiled
        )
    assert grpo_args.per_device_train_batch_size % grpo_args.num_generations == 0


def test_grpo_steps_are_capped_unless_max_steps_is_set(
    tmp_path: Path, compiled: CompiledDataset
) -> None:
    questions = len(compiled.grpo_train)
    by_epochs = math.ceil(questions / 2) * 3  # batch 2, 3 epochs

    def steps(method: Literal["kto", "grpo"], **kw: object) -> int:
        spec = _spec(tmp_path, tmp_path, compiled, batch_size=2, epochs=3.0, **kw)
        with quiet_hf():
            args, _ = build_configs(spec, method, compiled)
        return int(args.max_steps)

    assert by_epochs > 3
    assert steps("grpo", max_steps=None, grpo_max_steps=3) == 3
    assert steps("grpo", max_steps=None, grpo_max_steps=by_epochs + 10) == by_epochs
    assert steps("grpo", max_steps=None, grpo_max_steps=None) == -1  # epochs decide
    assert steps("grpo", max_steps=5, grpo_max_steps=3) == 5  # an explicit max_steps wins
    assert steps("kto", max_steps=None, grpo_max_steps=3) == -1  # GRPO's cap only
    with pytest.raises(InvalidSpec, match="grpo_max_steps"):
        _spec(tmp_path, tmp_path, compiled, grpo_max_steps=0)


def test_training_from_a_written_dataset_directory(
    data_dir: Path, tmp_path: Path, compiled: CompiledDataset
) -> None:
    write_jsonl(compiled, tmp_path / "dataset")
    result = train(_spec(data_dir, tmp_path / "run", tmp_path / "dataset", max_steps=1))
    assert result.method == "dpo" and result.num_examples == len(compiled.pairs_train)
    metrics = json.loads((result.adapter_dir / "metrics.json").read_text())
    assert metrics["data_content_hash"] == compiled.card.content_hash
