"""LoRA preference training with TRL: a validated spec in, a plain PEFT adapter out.

``TrainSpec`` → :func:`build_configs` (TRL config + PEFT ``LoraConfig``) → :func:`train`, which
reports progress through a callback, checkpoints every N steps, resumes, and writes an adapter
directory holding only ``adapter_config.json``, ``adapter_model.safetensors`` and ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainer._quiet import quiet_hf
from trainer.base_models import load_base_model, pick_device, resolve_base_model
from trainer.compiler import CompiledDataset, load_compiled
from trainer.errors import (
    CorruptAdapter,
    InvalidSpec,
    NotEnoughData,
    TrainingCancelled,
    TrainingDiverged,
)

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import TrainerCallback, TrainingArguments

    from trainer.judge import JudgeQuality
    from trainer.rewards import TenantJudge

__all__ = [
    "ADAPTER_FILES",
    "MAX_LORA_RANK",
    "Method",
    "RewardFn",
    "TrainProgress",
    "TrainResult",
    "TrainSpec",
    "build_configs",
    "choose_method",
    "distinct_questions",
    "needs_judge",
    "plan_method",
    "sha256_file",
    "train",
    "verify_adapter",
]

logger = logging.getLogger(__name__)

Method = Literal["auto", "dpo", "kto", "grpo"]
RewardFn = Callable[[Sequence[Mapping[str, str]], str], float]
"""Scores an answer to a conversation: ``(messages, answer) -> float`` (higher is better)."""

MAX_LORA_RANK = 64
"""The largest rank the serving tier accepts (vLLM ``--max-lora-rank``)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS_FILE = "metrics.json"
TENANT_JUDGE_REWARD = "tenant_judge"
"""``metrics["reward"]`` of a GRPO adapter rewarded by the tenant's thumbs judge."""
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METRICS_FILE)
CHECKPOINT_METHOD = "method.txt"
"""In ``checkpoints/``: the method that wrote them (a retry resumes only the same method)."""

# "LoRA Without Regret" (Schulman et al., Thinking Machines, 2025): with alpha held fixed (32) and
# PEFT's alpha/r scaling, the best LoRA learning rate is about 10x the best full fine-tuning rate
# and nearly independent of rank. Full fine-tunes of small chat models sit around 1e-5..5e-5,
# hence 2e-4; the feasibility probe saw SmolLM2 DPO converge cleanly at 5e-4 as well.
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_ALPHA = 32


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs. Validated on construction (:class:`InvalidSpec`)."""

    base_model: str
    """A registered base-model name or a local model directory (see ``resolve_base_model``)."""
    data: CompiledDataset | Path
    """A compiled dataset, or a directory written by ``write_jsonl``."""
    output_dir: Path
    """Run directory: ``adapter/`` (the result) and ``checkpoints/`` go here."""
    data_dir: Path
    """Where base models are materialized (``<data_dir>/models``)."""
    method: Method = "auto"
    """``auto`` picks DPO with at least ``min_pairs`` training pairs, else KTO."""
    rank: int = 16
    """LoRA rank; at most :data:`MAX_LORA_RANK` so the serving tier can load the adapter."""
    alpha: int = DEFAULT_ALPHA
    """LoRA alpha (kept fixed across ranks, see the learning-rate note)."""
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    """``all-linear`` (recommended: attention-only LoRA underperforms) or module names."""
    learning_rate: float = DEFAULT_LEARNING_RATE
    max_steps: int | None = None
    """Optimizer steps; when unset, ``epochs`` passes over the data."""
    epochs: float = 2.0
    batch_size: int = 4
    """Examples per step: DPO pairs, KTO rows, GRPO questions (each answered
    ``num_generations`` times)."""
    grad_accum: int = 1
    beta: float = 0.1
    """DPO/KTO temperature; for GRPO the KL coefficient against the base model."""
    max_length: int = 512
    """Tokens per prompt+answer; longer examples are truncated."""
    num_generations: int = 4
    """GRPO: answers sampled per prompt."""
    max_completion_length: int = 64
    """GRPO: tokens per sampled answer."""
    min_pairs: int = 8
    """``auto`` uses DPO from this many training pairs on."""
    seed: int = 0
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every N steps (``None``: only when stopped early)."""
    resume: bool = False
    """Continue from the last checkpoint in ``output_dir/checkpoints`` if there is one; if the
    run already finished (same data, method, base and rank), return its adapter as is."""
    keep_checkpoints: bool = False
    """Keep ``checkpoints/`` after a successful run (they are deleted by default)."""
    reward_model: Path | None = None
    """GRPO: a pairwise reward-model adapter (``train_reward_model``) to reward with instead of
    the tenant's thumbs judge."""
    min_judge_auroc: float = 0.65
    """GRPO rewards with the tenant's thumbs judge only when its AUROC on thumbs it never saw
    reaches this (and excludes chance); otherwise the run falls back to KTO or DPO."""
    grpo_min_questions: int = 64
    """``auto`` picks GRPO from this many distinct training questions on, if the judge is
    trusted: GRPO learns from the questions, and fewer make a narrow adapter."""
    grpo_max_steps: int | None = 28
    """GRPO: at most this many optimizer steps when ``max_steps`` is unset (``None``: ``epochs``
    alone decide). A GRPO step samples ``num_generations`` fresh answers per question and costs
    about five DPO/KTO steps (27 s on SmolLM2 and two CPU cores, a third of it generation);
    its questions are prompts to answer anew rather than labels to fit, so more passes over
    them buy less than they cost. 28 keeps a tenant's training and evaluation within 20 minutes
    there."""
    answer_check_weight: float = 0.5
    """GRPO: weight of the code-checked reward (1 for an answer; 0 for an empty one, one word
    repeated or a loop) beside the judge's P(up), which weighs 1. 0 turns it off."""
    gradient_checkpointing: bool = False
    """Off by default: for models of ~100M parameters it costs 1.5-2x in speed for little memory."""
    device: str | None = None
    """``cuda``/``cpu``; default: CUDA when present."""

    def __post_init__(self) -> None:
        if self.method not in ("auto", "dpo", "kto", "grpo"):
            raise InvalidSpec(f"method must be auto, dpo, kto or grpo, got {self.method!r}")
        if not 1 <= self.rank <= MAX_LORA_RANK:
            raise InvalidSpec(
                f"LoRA rank must be between 1 and {MAX_LORA_RANK} (the serving tier's limit), "
                f"got {self.rank}"
            )
        if self.alpha <= 0:
            raise InvalidSpec(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidSpec(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.learning_rate <= 1e-2:
            raise InvalidSpec(
                f"learning_rate must be in (0, 0.01], got {self.learning_rate}; "
                f"LoRA usually wants 1e-4..5e-4 (default {DEFAULT_LEARNING_RATE})"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidSpec(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise InvalidSpec(f"epochs must be positive, got {self.epochs}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise InvalidSpec("batch_size and grad_accum must be at least 1")
        _check_method_settings(self, self.method)  # again once auto or a fallback resolved
        if self.max_length < 16:
            raise InvalidSpec(f"max_length must be at least 16 tokens, got {self.max_length}")
        if not 0.5 <= self.min_judge_auroc <= 1.0:
            raise InvalidSpec(f"min_judge_auroc must be in [0.5, 1], got {self.min_judge_auroc}")
        if self.grpo_max_steps is not None and self.grpo_max_steps < 1:
            raise InvalidSpec(f"grpo_max_steps must be at least 1, got {self.grpo_max_steps}")
        if self.grpo_min_questions < 1:
            raise InvalidSpec(
                f"grpo_min_questions must be at least 1, got {self.grpo_min_questions}"
            )
        if self.answer_check_weight < 0:
            raise InvalidSpec(f"answer_check_weight must be >= 0, got {self.answer_check_weight}")
        if self.num_generations < 2:
            raise InvalidSpec("GRPO compares answers to one prompt: num_generations must be >= 2")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise InvalidSpec(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise InvalidSpec("target_modules must be 'all-linear' or a tuple of module names")


@dataclass(frozen=True)
class TrainProgress:
    """One progress report, sent after every optimizer step."""

    step: int
    total_steps: int
    loss: float | None
    metrics: dict[str, float]
    """Everything TRL logged at this step (rewards/margins, accuracies, KL, grad norm...)."""
    elapsed_s: float
    eta_s: float | None
    checkpoint: str | None
    """The newest resumable checkpoint directory, if any (heartbeat it)."""


ProgressFn = Callable[[TrainProgress], bool | None]


@dataclass(frozen=True)
class TrainResult:
    """A finished run: the adapter directory and what to record about it."""

    adapter_dir: Path
    weights_sha256: str
    method: str
    base_model: str
    rank: int
    steps: int
    num_examples: int
    train_runtime_s: float
    metrics: dict[str, Any]
    """Final metrics (also in ``metrics.json``): train loss, last logged TRL metrics."""
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir)
        return d


Chosen = Literal["dpo", "kto", "grpo"]


def distinct_questions(data: CompiledDataset) -> int:
    """Distinct conversations in the training split: what GRPO samples answers for."""
    return len({json.dumps(p, sort_keys=True) for p in data.grpo_train})


def needs_judge(spec: TrainSpec, data: CompiledDataset) -> bool:
    """Whether choosing the method reads the tenant's judge: GRPO asked for without a reward
    model of its own, or ``auto`` with enough questions for GRPO."""
    if spec.reward_model is not None:
        return False
    if spec.method == "grpo":
        return True
    return spec.method == "auto" and distinct_questions(data) >= spec.grpo_min_questions


def choose_method(
    spec: TrainSpec,
    data: CompiledDataset,
    judge: JudgeQuality | None = None,
    *,
    reward_given: bool = False,
) -> Chosen:
    """Resolve ``auto`` and check the data supports the method (:class:`NotEnoughData`)."""
    return plan_method(spec, data, judge, reward_given=reward_given)[0]


def plan_method(
    spec: TrainSpec,
    data: CompiledDataset,
    judge: JudgeQuality | None = None,
    *,
    reward_given: bool = False,
) -> tuple[Chosen, str]:
    """The method a run trains with, and why, in words for the run's log.

    ``auto``: GRPO when the tenant's thumbs judge is trusted (``judge``) and the training split
    has at least ``grpo_min_questions`` distinct questions; else DPO from ``min_pairs``
    preference pairs on; else KTO, which learns from single thumbs. ``grpo`` falls back the
    same way when the judge may not reward (unless ``reward_given`` or ``spec.reward_model``).
    """
    n_pairs = len(data.pairs_train)
    kto_labels = {ex.label for ex in data.kto_train}

    def offline(how: str) -> tuple[Chosen, str]:
        if n_pairs >= spec.min_pairs:
            return "dpo", f"{how} DPO: {n_pairs} preference pairs (>= {spec.min_pairs})"
        if len(data.kto_train) >= 2 and len(kto_labels) == 2:
            return "kto", (
                f"{how} KTO: {n_pairs} preference pairs (DPO needs {spec.min_pairs}), so it "
                f"learns from {len(data.kto_train)} single thumbs"
            )
        raise NotEnoughData(
            f"{n_pairs} preference pairs (DPO needs {spec.min_pairs}) and "
            f"{len(data.kto_train)} rated answers with labels {sorted(kto_labels)} "
            "(KTO needs up- and down-votes): collect more feedback"
        )

    trusted = judge is not None and judge.trusted
    judge_says = judge.reason if judge is not None else "no judge was fitted"
    method = spec.method
    if method == "auto":
        questions = distinct_questions(data)
        if questions >= spec.grpo_min_questions and trusted:
            return "grpo", (
                f"auto chose GRPO: the tenant's judge may reward ({judge_says}) and the training "
                f"split has {questions} distinct questions (>= {spec.grpo_min_questions})"
            )
        chosen, why = offline("auto chose")
        if questions < spec.grpo_min_questions:
            return chosen, (
                f"{why}; not GRPO: {questions} distinct training questions "
                f"(GRPO from {spec.grpo_min_questions})"
            )
        return chosen, f"{why}; not GRPO: {judge_says}"
    if method == "grpo":
        if not data.grpo_train:
            raise NotEnoughData("GRPO needs prompts: the training split is empty")
        if reward_given or spec.reward_model is not None:
            return "grpo", "GRPO, as asked, with the reward it was given"
        if trusted:
            return "grpo", f"GRPO, as asked, rewarded by the tenant's judge ({judge_says})"
        chosen, why = offline("GRPO fell back to")
        return chosen, f"{why}: the judge may not reward ({judge_says})"
    if method == "dpo" and n_pairs == 0:
        raise NotEnoughData(
            "DPO needs an up-voted and a down-voted answer to the same prompt (or a correction); "
            "none in the training split: use method 'kto' or collect more feedback"
        )
    if method == "kto" and (len(data.kto_train) < 2 or len(kto_labels) < 2):
        raise NotEnoughData("KTO needs both up- and down-votes in the training split")
    return method, f"{method.upper()}, as asked"


def _check_method_settings(spec: TrainSpec, method: str) -> None:
    """The spec's checks for the method that will run (``auto`` or a GRPO fallback resolves to
    one the spec was not checked for)."""
    if method == "kto" and spec.batch_size < 2:
        raise InvalidSpec("KTO estimates its KL term across a batch: batch_size must be >= 2")
    if method != "grpo" and spec.beta <= 0:
        raise InvalidSpec(f"beta must be positive for {method.upper()}, got {spec.beta}")


def _total_steps_hint(spec: TrainSpec, n_rows: int, method: str | None = None) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    per_step = spec.batch_size * spec.grad_accum
    steps = max(1, math.ceil(math.ceil(n_rows / per_step) * spec.epochs))
    if method == "grpo" and spec.grpo_max_steps is not None:
        return min(steps, spec.grpo_max_steps)
    return steps


def build_configs(
    spec: TrainSpec, method: Literal["dpo", "kto", "grpo"], data: CompiledDataset
) -> tuple[TrainingArguments, LoraConfig]:
    """Map a spec to TRL's config for ``method`` and PEFT's ``LoraConfig``."""
    from peft import LoraConfig
    from trl import DPOConfig, GRPOConfig, KTOConfig

    device, dtype = pick_device(spec.device)
    import torch

    on_cpu = not device.startswith("cuda")
    common: dict[str, Any] = {
        "output_dir": str(spec.output_dir / "checkpoints"),
        "learning_rate": spec.learning_rate,
        "per_device_train_batch_size": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "max_steps": spec.max_steps if spec.max_steps is not None else -1,
        "num_train_epochs": spec.epochs,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 0,
        "seed": spec.seed,
        "data_seed": spec.seed,
        "logging_steps": 1,
        # The default filter hides NaN losses in logs; we want to see them and stop.
        "logging_nan_inf_filter": False,
        "save_strategy": "steps" if spec.checkpoint_every else "no",
        "save_steps": spec.checkpoint_every or 500,
        "save_total_limit": 2,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": on_cpu,
        # bf16 autocast is emulated (about 9x slower) on AVX2-only CPUs: fp32 there.
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "remove_unused_columns": False,
    }
    args: TrainingArguments
    if method == "dpo":
        args = DPOConfig(**common, beta=spec.beta, max_length=spec.max_length)
    elif method == "kto":
        args = KTOConfig(
            **common,
            beta=spec.beta,
            max_length=spec.max_length,
            desirable_weight=data.desirable_weight,
            undesirable_weight=data.undesirable_weight,
        )
    else:
        # TRL counts completions per batch: batch_size questions, each answered
        # num_generations times (one question per step made every step's reward noise).
        common["per_device_train_batch_size"] = spec.batch_size * spec.num_generations
        if spec.max_steps is None and spec.grpo_max_steps is not None:
            # The epochs' steps, capped (HF's max_steps overrides epochs when set).
            common["max_steps"] = _total_steps_hint(spec, len(data.grpo_train), "grpo")
        args = GRPOConfig(
            **common,
            beta=spec.beta,
            num_generations=spec.num_generations,
            max_completion_length=spec.max_completion_length,
            use_vllm=False,
            log_completions=False,
            # The judge (or the reward given) weighs 1; the code-checked reward follows it.
            reward_weights=[1.0, spec.answer_check_weight] if spec.answer_check_weight else None,
        )
    target: str | list[str] = (
        spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    )
    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
        bias="none",
    )
    return args, lora


def _make_callback(progress: ProgressFn | None, total_hint: int, started: float) -> TrainerCallback:
    from transformers import TrainerCallback

    class _Reporter(TrainerCallback):
        """Forwards logs to ``progress``, stops on NaN and on a cancellation request."""

        def __init__(self) -> None:
            self.cancelled_at: int | None = None
            self.stop_requested = False
            """Set when a heartbeat inside the step (GRPO's generation) asked to stop."""
            self.checkpoint: str | None = None
            self.history: list[dict[str, float]] = []
            self._first_step_at: float | None = None
            self._first_step: int = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._first_step = state.global_step

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.checkpoint = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_log(
            self,
            args: Any,
            state: Any,
            control: Any,
            logs: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary
            numeric = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            numeric["step"] = float(state.global_step)
            self.history.append(numeric)
            loss = numeric.get("loss")
            if loss is None or not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss} at step {state.global_step}: lower the learning rate "
                    "(or check the base model's weights)"
                )
            now = time.monotonic()
            if self._first_step_at is None:
                self._first_step_at = now
            done = state.global_step - self._first_step
            total = state.max_steps or total_hint
            eta: float | None = None
            if done > 1:
                eta = (now - self._first_step_at) / (done - 1) * (total - state.global_step)
            report = TrainProgress(
                step=state.global_step,
                total_steps=total,
                loss=loss,
                metrics=numeric,
                elapsed_s=now - started,
                eta_s=eta,
                checkpoint=self.checkpoint,
            )
            stop = progress is not None and progress(report) is False
            if stop or self.stop_requested:
                # Graceful stop: save a checkpoint first so resume=True can continue.
                self.cancelled_at = state.global_step
                control.should_save = True
                control.should_training_stop = True

    return _Reporter()


def _rows(method: str, data: CompiledDataset) -> list[dict[str, Any]]:
    if method == "dpo":
        return [p.to_trl() for p in data.pairs_train]
    if method == "kto":
        return [k.to_trl() for k in data.kto_train]
    return [{"prompt": p} for p in data.grpo_train]


def _grpo_reward(
    reward_fn: RewardFn, beat: Callable[[int, int], None]
) -> Callable[..., list[float]]:
    def reward(prompts: list[Any], completions: list[Any], **kw: Any) -> list[float]:
        out: list[float] = []
        for prompt, completion in zip(prompts, completions, strict=True):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            out.append(float(reward_fn(messages, text)))
        beat(int(getattr(kw.get("trainer_state"), "global_step", 0)), 0)
        return out

    name = getattr(reward_fn, "__name__", "reward")
    reward.__name__ = name if name.isidentifier() else "reward"  # TRL logs rewards/<name>/...
    return reward


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_adapter(adapter_dir: Path, *, expected_sha256: str | None = None) -> dict[str, Any]:
    """Check an adapter directory is loadable; return its ``adapter_config.json``.

    Raises :class:`CorruptAdapter` if a file is missing, unparsable, holds non-finite weights,
    or the weights do not match ``expected_sha256``.
    """
    config_path = adapter_dir / ADAPTER_CONFIG
    weights = adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights):
        if not path.is_file():
            raise CorruptAdapter(f"adapter {adapter_dir} is missing {path.name}: re-run training")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or "r" not in config:
            raise ValueError("not a LoRA adapter config")
    except ValueError as exc:
        raise CorruptAdapter(f"{config_path} is not a valid adapter config: {exc}") from exc
    if expected_sha256 is not None and sha256_file(weights) != expected_sha256:
        raise CorruptAdapter(f"{weights} does not match its recorded sha256: the file changed")
    try:
        import torch
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own and OS errors; all mean "unreadable"
        raise CorruptAdapter(f"{weights} is not a readable safetensors file: {exc}") from exc
    if not tensors:
        raise CorruptAdapter(f"{weights} holds no tensors")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise CorruptAdapter(f"{weights} holds NaN or infinite values")
    return config


def _export_adapter(model: Any, out: Path, base_model: str, metrics: dict[str, Any]) -> str:
    """Write only the two PEFT files plus metrics.json into ``out`` (atomically); return sha256."""
    import torch

    for name, param in model.named_parameters():
        if "lora_" in name and not bool(torch.isfinite(param).all()):
            raise TrainingDiverged(f"adapter weight {name} is NaN/inf: lower the learning rate")
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    full = staging / "full"
    model.save_pretrained(str(full))
    staging.mkdir(exist_ok=True)
    config = json.loads((full / ADAPTER_CONFIG).read_text())
    # The artifact names its base by registry name, not a host-local path.
    config["base_model_name_or_path"] = base_model
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.move(str(full / ADAPTER_WEIGHTS), staging / ADAPTER_WEIGHTS)
    shutil.rmtree(full)
    digest = sha256_file(staging / ADAPTER_WEIGHTS)
    metrics = {**metrics, "weights_sha256": digest}
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return digest


def _last_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not checkpoints.is_dir():
        return None
    return get_last_checkpoint(str(checkpoints))


def adapter_metrics(adapter_dir: Path) -> dict[str, Any] | None:
    """An adapter's ``metrics.json`` (what trained it and how), or None when it has none."""
    try:
        metrics = json.loads((adapter_dir / METRICS_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def rewarded_by_tenant_judge(metrics: Mapping[str, Any]) -> bool:
    """Whether an adapter with these metrics was trained to please the tenant's thumbs judge
    (GRPO rewarded by it; a GRPO adapter from before metrics said was, since the platform's
    runs reward with nothing else)."""
    return metrics.get("method") == "grpo" and (
        metrics.get("reward", TENANT_JUDGE_REWARD) == TENANT_JUDGE_REWARD
    )


def _finished_result(spec: TrainSpec, data: CompiledDataset) -> TrainResult | None:
    """The result of an earlier, completed run of this same spec and data, if there is one
    (whichever method it resolved to: a retry of an ``auto`` run that chose KTO is done)."""
    adapter_dir = spec.output_dir / "adapter"
    metrics = adapter_metrics(adapter_dir)
    if metrics is None:
        return None
    same = (
        metrics.get("data_content_hash") == data.card.content_hash
        and metrics.get("requested_method", metrics.get("method")) == spec.method
        and metrics.get("base_model") == spec.base_model
        and metrics.get("rank") == spec.rank
    )
    if not same:
        return None
    verify_adapter(adapter_dir, expected_sha256=metrics.get("weights_sha256"))
    logger.info("run in %s already finished; returning its adapter", spec.output_dir)
    return TrainResult(
        adapter_dir=adapter_dir,
        weights_sha256=str(metrics["weights_sha256"]),
        method=str(metrics["method"]),
        base_model=spec.base_model,
        rank=spec.rank,
        steps=int(metrics["steps"]),
        num_examples=int(metrics["num_examples"]),
        train_runtime_s=float(metrics["train_runtime_s"]),
        metrics=metrics,
    )


def _make_trainer(
    method: str, kwargs: dict[str, Any], rewards: list[Callable[..., list[float]]]
) -> Any:
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer

    if method == "dpo":
        return DPOTrainer(**kwargs)
    if method == "kto":
        return KTOTrainer(**kwargs)
    reward_funcs: list[Any] = list(rewards)
    return GRPOTrainer(**kwargs, reward_funcs=reward_funcs)


def _tenant_judge(spec: TrainSpec, data: CompiledDataset, phase: PhaseFn | None) -> TenantJudge:
    """Fit (or, on a retry, load) the tenant's judge, heartbeating as it reads answers."""
    from trainer.judge import JUDGE_FILE
    from trainer.rewards import load_or_fit_judge

    def beat(done: int, total: int) -> None:
        if phase is not None and phase("judge", done, total) is False:
            raise TrainingCancelled("cancelled while fitting the tenant's judge", step=0)

    beat(0, len(data.kto_train) + len(data.kto_holdout))
    return load_or_fit_judge(
        base_model=spec.base_model,
        data=data,
        path=spec.output_dir / JUDGE_FILE,
        data_dir=spec.data_dir,
        min_auroc=spec.min_judge_auroc,
        seed=spec.seed,
        device=spec.device,
        beat=beat,
    )


def _grpo_rewards(
    spec: TrainSpec,
    reward_fn: RewardFn | None,
    tenant_judge: TenantJudge | None,
    phase: PhaseFn | None,
    reporter: Any,
    total_steps: int,
) -> list[Callable[..., list[float]]]:
    """GRPO's reward functions, in the order of ``GRPOConfig.reward_weights``."""
    from trainer.rewards import JudgeReward, answer_check

    def beat(step: int, _: int) -> None:
        if phase is not None and phase("generation", step, total_steps) is False:
            reporter.stop_requested = True  # the step ends, saves a checkpoint and stops

    first: Callable[..., list[float]]
    if reward_fn is None and spec.reward_model is not None:
        from trainer.reward_model import load_reward_model

        reward_fn = load_reward_model(
            spec.reward_model,
            base_model=spec.base_model,
            data_dir=spec.data_dir,
            device=spec.device,
        )
    if reward_fn is not None:
        first = _grpo_reward(reward_fn, beat)
    else:
        assert tenant_judge is not None and tenant_judge.judge is not None  # plan_method's rule
        first = JudgeReward(
            tenant_judge.judge, tenant_judge.model, tenant_judge.tokenizer, beat=beat
        )
    return [first, answer_check] if spec.answer_check_weight else [first]


PhaseFn = Callable[[str, int, int], bool | None]
"""Heartbeat of a phase without optimizer steps: ``(phase, done, total) -> False to stop``.
Phases: ``judge`` (answers read while fitting the tenant's judge), ``generation`` (GRPO's
sampled groups scored, ``done`` is the step)."""


def train(
    spec: TrainSpec,
    *,
    progress: ProgressFn | None = None,
    reward_fn: RewardFn | None = None,
    phase: PhaseFn | None = None,
) -> TrainResult:
    """Train a LoRA adapter per ``spec`` and write it to ``spec.output_dir / "adapter"``.

    ``progress`` is called after every step; returning ``False`` stops training after saving a
    checkpoint (then :class:`TrainingCancelled` is raised), and any exception it raises
    propagates unchanged. ``phase`` is the heartbeat of the work between steps; returning
    ``False`` stops there too (while fitting the judge, before any checkpoint).

    GRPO rewards with ``reward_fn`` when given, else ``spec.reward_model``, else the tenant's
    thumbs judge, fitted on the train split (saved in ``output_dir/judge.json``, so a retry
    reuses it) and used only when trusted; otherwise the run falls back to DPO or KTO. The
    result's ``metrics["method_reason"]`` says which method ran and why.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed

    started, cpu_started = time.monotonic(), time.process_time()
    data = spec.data if isinstance(spec.data, CompiledDataset) else load_compiled(spec.data)
    if spec.resume:
        finished = _finished_result(spec, data)
        if finished is not None:  # a retry after the run completed: nothing left to do
            return finished
    tenant_judge: TenantJudge | None = None
    if reward_fn is None and needs_judge(spec, data):
        tenant_judge = _tenant_judge(spec, data, phase)
    judge_quality = tenant_judge.quality if tenant_judge is not None else None
    judge_reused = tenant_judge is not None and tenant_judge.reused
    method, method_reason = plan_method(
        spec, data, judge_quality, reward_given=reward_fn is not None
    )
    logger.info("%s", method_reason)
    if method != "grpo":
        tenant_judge = None  # frees its copy of the base model
    _check_method_settings(spec, method)
    rows = _rows(method, data)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = spec.output_dir / "checkpoints"
    marker = checkpoints / CHECKPOINT_METHOD
    if checkpoints.exists() and (
        not spec.resume or not marker.is_file() or marker.read_text().strip() != method
    ):
        # A fresh run must not mix with an old one's checkpoints, nor a retry with those of
        # another method (an attempt before a deploy changed the rule, say).
        shutil.rmtree(checkpoints)
    resume_from = _last_checkpoint(checkpoints) if spec.resume else None
    checkpoints.mkdir(exist_ok=True)
    marker.write_text(method + "\n")

    total_hint = _total_steps_hint(spec, len(rows), method)
    reporter = _make_callback(progress, total_hint, started)
    rewards: list[Callable[..., list[float]]] = []
    if method == "grpo":
        rewards = _grpo_rewards(spec, reward_fn, tenant_judge, phase, reporter, total_hint)

    resolve_base_model(spec.base_model, data_dir=spec.data_dir)  # fail fast on a bad name
    with quiet_hf():
        args, lora = build_configs(spec, method, data)
    set_seed(spec.seed)  # LoRA's A matrices are initialized from the global RNG
    model, tokenizer = load_base_model(spec.base_model, data_dir=spec.data_dir, device=spec.device)
    dataset = Dataset.from_list(rows)
    logger.info(
        "training %s on %s: %d examples, rank %d, lr %g, ~%d steps%s",
        method,
        spec.base_model,
        len(rows),
        spec.rank,
        spec.learning_rate,
        total_hint,
        f", resuming from {resume_from}" if resume_from else "",
    )
    kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": dataset,
        "processing_class": tokenizer,
        "peft_config": lora,
        "callbacks": [reporter],
    }
    trainer: Any
    with quiet_hf():  # the trainers tokenize the dataset in __init__
        trainer = _make_trainer(method, kwargs, rewards)
    trainer.remove_callback(PrinterCallback)  # progress goes through our callback and logging
    with quiet_hf():
        output = trainer.train(resume_from_checkpoint=resume_from)
    r: Any = reporter
    if r.cancelled_at is not None:
        raise TrainingCancelled(
            f"training stopped at step {r.cancelled_at}; checkpoint {r.checkpoint} kept",
            step=r.cancelled_at,
        )
    history: list[dict[str, float]] = r.history
    final = dict(history[-1]) if history else {}
    metrics: dict[str, Any] = {
        "method": method,
        "base_model": spec.base_model,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "learning_rate": spec.learning_rate,
        "beta": spec.beta,
        "seed": spec.seed,
        "steps": int(trainer.state.global_step),
        "num_examples": len(rows),
        "train_loss": float(output.training_loss),
        "train_runtime_s": round(time.monotonic() - started, 3),
        # The whole process's CPU time (torch's threads included; so is anything else the
        # process ran meanwhile): what the benchmark compares methods by.
        "cpu_s": round(time.process_time() - cpu_started, 1),
        "final": final,
        "data_content_hash": data.card.content_hash,
        "resumed_from": resume_from,
        "method_reason": method_reason,
        "requested_method": spec.method,
    }
    if method == "grpo":
        # Metered: prompt and completion tokens of every sampled group (TRL's count, kept in
        # checkpoints), plus the conversations the judge read to fit itself.
        judge_tokens = tenant_judge.tokens if tenant_judge is not None else 0
        metrics["tokens"] = int(trainer.state.num_input_tokens_seen) + judge_tokens
        metrics["judge_tokens"] = judge_tokens
        # What the adapter was trained to please: the evaluation cannot count that judge's win
        # rate as independent evidence (trainer.gate).
        metrics["reward"] = (
            "reward_fn"
            if reward_fn is not None
            else "reward_model"
            if spec.reward_model is not None
            else TENANT_JUDGE_REWARD
        )
    if judge_quality is not None:
        metrics["judge"] = judge_quality.to_dict()
        metrics["judge_reused"] = judge_reused
    adapter_dir = spec.output_dir / "adapter"
    digest = _export_adapter(trainer.model, adapter_dir, spec.base_model, metrics)
    if not spec.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    logger.info("trained %s adapter %s (sha256 %s…)", method, adapter_dir, digest[:12])
    return TrainResult(
        adapter_dir=adapter_dir,
        weights_sha256=digest,
        method=method,
        base_model=spec.base_model,
        rank=spec.rank,
        steps=int(trainer.state.global_step),
        num_examples=len(rows),
        train_runtime_s=float(metrics["train_runtime_s"]),
        metrics={**metrics, "weights_sha256": digest},
        history=history,
    )
