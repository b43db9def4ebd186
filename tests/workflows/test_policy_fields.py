"""A policy setting travels one path: ``TrainingPolicy`` → ``RunOptions`` → ``TrainSpec`` and
``GatePolicy``, by field name. These checks fail when a setting is added to one and not the
others, or is renamed on the way."""

from __future__ import annotations

from dataclasses import fields

from api.orchestration import Orchestrator
from core.policy import TrainingPolicy
from trainer import GatePolicy, TrainSpec
from workflows.contracts import RunOptions

POLICY = set(TrainingPolicy.model_fields)
OPTIONS = {f.name for f in fields(RunOptions)}
SPEC = {f.name for f in fields(TrainSpec)}
GATE = {f.name for f in fields(GatePolicy)}

API_ONLY = {"auto_train_after", "schedule", "fallback_to_base", "monthly_budget_usd"}
API_ONLY |= {"inference_over_budget"}
"""Settings the API acts on itself (triggers, serving, billing): never part of a run."""
RUN_ONLY = {"base_model", "batch_size", "checkpoint_every", "heartbeat_timeout_s"}
RUN_ONLY |= {"eval_max_new_tokens", "seed", "canary_poll_s"}
"""Run settings that are the operator's, not the tenant's."""
EVALUATION = {"min_feedback", "min_judge_auroc", "require_approval", "approval_timeout_hours"}
EVALUATION |= {"eval_max_new_tokens", "heartbeat_timeout_s"}
EVALUATION |= {"rollout", "canary_fraction", "canary_min_thumbs", "canary_max_hours"}
EVALUATION |= {"canary_poll_s"}
"""Run settings read by the workflow and its activities, not by the trainer or the gate."""


def test_field_sets_agree() -> None:
    assert GATE <= POLICY and GATE <= OPTIONS
    assert POLICY - API_ONLY == OPTIONS - RUN_ONLY
    trained = OPTIONS - GATE - EVALUATION
    assert trained <= SPEC, f"run options the trainer does not know: {trained - SPEC}"


def test_every_shared_setting_reaches_the_run_unchanged() -> None:
    changed = TrainingPolicy(
        method="kto",
        grpo_min_questions=32,
        grpo_max_steps=9,
        answer_check_weight=1.0,
        min_feedback=9,
        max_steps=7,
        epochs=3.0,
        rank=8,
        learning_rate=3e-4,
        beta=0.2,
        min_pref_improvement=0.02,
        min_win_rate=0.55,
        min_judge_auroc=0.7,
        max_capability_drop=0.03,
        max_regression_kl=0.4,
        max_ppl_increase=0.2,
        require_approval=True,
        approval_timeout_hours=2,
        rollout="canary",
        canary_fraction=0.3,
        canary_min_thumbs=12,
        canary_max_hours=5,
    )
    defaults = TrainingPolicy()
    shared = POLICY & OPTIONS
    assert all(getattr(changed, n) != getattr(defaults, n) for n in shared), "change them all"
    options = Orchestrator(None, base_model="tiny-random").options(changed)
    assert {n: getattr(options, n) for n in shared} == {n: getattr(changed, n) for n in shared}
    assert options.base_model == "tiny-random"
    gate = GatePolicy(**{n: getattr(options, n) for n in GATE})
    assert gate.min_win_rate == 0.55 and gate.max_capability_drop == 0.03


def test_defaults_agree_along_the_path() -> None:
    policy, options, gate = TrainingPolicy(), RunOptions(), GatePolicy()
    for name in POLICY & OPTIONS:
        assert getattr(policy, name) == getattr(options, name), name
    for name in GATE:
        assert getattr(options, name) == getattr(gate, name), name
    spec_defaults = {f.name: f.default for f in fields(TrainSpec)}
    trained = ("rank", "learning_rate", "beta", "epochs", "batch_size", "method", "seed")
    grpo = ("grpo_min_questions", "grpo_max_steps", "answer_check_weight", "min_judge_auroc")
    for name in (*trained, *grpo):
        assert getattr(options, name) == spec_defaults[name], name


def test_every_setting_explains_itself() -> None:
    schema = TrainingPolicy.model_json_schema()["properties"]
    for name in POLICY:
        assert len(schema[name].get("description", "")) > 20, f"{name} has no help text"
