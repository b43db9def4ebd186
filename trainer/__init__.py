"""tuneloop's trainer: feedback → datasets → LoRA adapters (TRL + PEFT) → evaluation and gate.

A plain library: it imports nothing else of tuneloop and no database, workflow or HTTP code.
Importing it is cheap; torch, transformers, TRL and PEFT load when a function needs them.
"""

from trainer.base_models import KNOWN_BASE_MODELS, load_base_model, pick_device, resolve_base_model
from trainer.capability import (
    CAPABILITY_KINDS,
    CapabilityResult,
    CapabilityTask,
    check_answer,
    load_capability_suite,
    run_capability_suite,
)
from trainer.compiler import (
    CompiledDataset,
    DataCard,
    FeedbackRecord,
    KTOExample,
    PreferencePair,
    compile_feedback,
    load_compiled,
    read_feedback_jsonl,
    scrub_pii,
    write_jsonl,
)
from trainer.errors import (
    BaseModelUnavailable,
    CorruptAdapter,
    InvalidFeedback,
    InvalidSpec,
    NotEnoughData,
    OneSidedFeedback,
    TrainerError,
    TrainingCancelled,
    TrainingDiverged,
    UnknownBaseModel,
)
from trainer.evaluation import EvalReport, Judge, evaluate
from trainer.gate import GateDecision, GatePolicy, gate
from trainer.generation import generate_answers, load_with_adapters
from trainer.judge import JudgeQuality, ThumbsJudge, train_thumbs_judge
from trainer.reward_model import RewardModel, load_reward_model, train_reward_model
from trainer.simulated_users import (
    DEMO_PROMPTS,
    PERSONAS,
    Persona,
    collect_feedback,
    sample_answers,
)
from trainer.training import (
    MAX_LORA_RANK,
    TrainProgress,
    TrainResult,
    TrainSpec,
    build_configs,
    train,
    verify_adapter,
)

__all__ = [
    "CAPABILITY_KINDS",
    "DEMO_PROMPTS",
    "KNOWN_BASE_MODELS",
    "MAX_LORA_RANK",
    "PERSONAS",
    "BaseModelUnavailable",
    "CapabilityResult",
    "CapabilityTask",
    "CompiledDataset",
    "CorruptAdapter",
    "DataCard",
    "EvalReport",
    "FeedbackRecord",
    "GateDecision",
    "GatePolicy",
    "InvalidFeedback",
    "InvalidSpec",
    "Judge",
    "JudgeQuality",
    "KTOExample",
    "NotEnoughData",
    "OneSidedFeedback",
    "Persona",
    "PreferencePair",
    "RewardModel",
    "ThumbsJudge",
    "TrainProgress",
    "TrainResult",
    "TrainSpec",
    "TrainerError",
    "TrainingCancelled",
    "TrainingDiverged",
    "UnknownBaseModel",
    "build_configs",
    "check_answer",
    "collect_feedback",
    "compile_feedback",
    "evaluate",
    "gate",
    "generate_answers",
    "load_base_model",
    "load_capability_suite",
    "load_compiled",
    "load_reward_model",
    "load_with_adapters",
    "pick_device",
    "read_feedback_jsonl",
    "resolve_base_model",
    "run_capability_suite",
    "sample_answers",
    "scrub_pii",
    "train",
    "train_reward_model",
    "train_thumbs_judge",
    "verify_adapter",
    "write_jsonl",
]
