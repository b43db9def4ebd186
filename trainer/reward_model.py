"""A tenant's reward model: LoRA on a sequence-classification head over the base model,
trained with TRL's ``RewardTrainer`` on the tenant's preference pairs.

It is both GRPO's reward and, in production, the tenant's judge for win rates.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer._quiet import quiet_hf
from trainer.base_models import pick_device, resolve_base_model
from trainer.compiler import CompiledDataset, load_compiled
from trainer.errors import InvalidSpec, NotEnoughData
from trainer.training import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_ALPHA,
    MAX_LORA_RANK,
    METRICS_FILE,
    sha256_file,
    verify_adapter,
)

__all__ = ["RewardModel", "RewardModelResult", "load_reward_model", "train_reward_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardModelResult:
    adapter_dir: Path
    weights_sha256: str
    steps: int
    metrics: dict[str, Any]


def train_reward_model(
    *,
    base_model: str,
    data: CompiledDataset | Path,
    output_dir: Path,
    data_dir: Path,
    rank: int = 16,
    learning_rate: float = 2e-4,
    max_steps: int | None = None,
    epochs: float = 2.0,
    batch_size: int = 4,
    max_length: int = 512,
    seed: int = 0,
    device: str | None = None,
) -> RewardModelResult:
    """Train a Bradley-Terry reward model on the data's training pairs; write it to ``output_dir``.

    ``output_dir`` then holds ``adapter_config.json`` (with the score head as a module to save),
    ``adapter_model.safetensors`` and ``metrics.json``.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
        set_seed,
    )
    from trl import RewardConfig, RewardTrainer

    if not 1 <= rank <= MAX_LORA_RANK:
        raise InvalidSpec(f"LoRA rank must be between 1 and {MAX_LORA_RANK}, got {rank}")
    compiled = data if isinstance(data, CompiledDataset) else load_compiled(data)
    if not compiled.pairs_train:
        raise NotEnoughData(
            "a reward model needs preference pairs (an up- and a down-voted answer to the same "
            "prompt, or a correction); there are none: collect more feedback"
        )
    started = time.monotonic()
    dev, dtype = pick_device(device)
    path = resolve_base_model(base_model, data_dir=data_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(seed)  # the score head is freshly initialized
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    work = output_dir.with_name(output_dir.name + ".work")
    with quiet_hf():
        args = RewardConfig(
            output_dir=str(work),
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            max_steps=max_steps if max_steps is not None else -1,
            num_train_epochs=epochs,
            max_length=max_length,
            seed=seed,
            data_seed=seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not dev.startswith("cuda"),
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            gradient_checkpointing=False,
        )
    lora = LoraConfig(
        r=rank,
        lora_alpha=DEFAULT_ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="SEQ_CLS",  # PEFT then also saves the new score head
    )
    rows = [p.to_trl() for p in compiled.pairs_train]
    with quiet_hf():
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
        trainer.remove_callback(PrinterCallback)
        output = trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    staging = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trained: Any = trainer.model
    trained.save_pretrained(str(staging / "full"))
    config = json.loads((staging / "full" / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = base_model
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.move(str(staging / "full" / ADAPTER_WEIGHTS), staging / ADAPTER_WEIGHTS)
    shutil.rmtree(staging / "full")
    digest = sha256_file(staging / ADAPTER_WEIGHTS)
    metrics = {
        "kind": "reward_model",
        "base_model": base_model,
        "rank": rank,
        "steps": int(trainer.state.global_step),
        "num_pairs": len(rows),
        "train_loss": float(output.training_loss),
        "final": {k: v for k, v in history[-1].items() if isinstance(v, int | float)}
        if history
        else {},
        "train_runtime_s": round(time.monotonic() - started, 3),
        "weights_sha256": digest,
    }
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("trained reward model %s on %d pairs", output_dir, len(rows))
    return RewardModelResult(output_dir, digest, int(trainer.state.global_step), metrics)


class RewardModel:
    """A loaded reward model; call it as a judge: ``rm(messages, answer) -> float``."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    def _text(self, messages: Sequence[Mapping[str, str]], answer: str) -> str:
        conversation = [dict(m) for m in messages] + [{"role": "assistant", "content": answer}]
        text: str = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return text

    def score_many(self, items: Sequence[tuple[Sequence[Mapping[str, str]], str]]) -> list[float]:
        import torch

        texts = [self._text(m, a) for m, a in items]
        batch = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
        ).to(self.model.device)
        with torch.no_grad():
            logits = self.model(**batch).logits
        return [float(x) for x in logits[:, 0].float().cpu()]

    def __call__(self, messages: Sequence[Mapping[str, str]], answer: str) -> float:
        return self.score_many([(messages, answer)])[0]


def load_reward_model(
    adapter_dir: Path, *, base_model: str, data_dir: Path, device: str | None = None
) -> RewardModel:
    """Load a reward model written by :func:`train_reward_model`.

    Raises :class:`CorruptAdapter` when the directory is not a readable adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    verify_adapter(adapter_dir)
    dev, dtype = pick_device(device)
    path = resolve_base_model(base_model, data_dir=data_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    base.config.pad_token_id = tokenizer.pad_token_id
    with quiet_hf():
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.to(dev)
    model.eval()
    return RewardModel(model, tokenizer)
