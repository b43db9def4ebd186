"""Adapters for serving tests: random LoRA weights, strong enough to change the tiny model's
greedy answers, so two tenants' adapters are told apart by what they say."""

from __future__ import annotations

from pathlib import Path


def make_adapter(data_dir: Path, out: Path, seed: int, scale: float = 8.0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.base_models import load_base_model

    torch.manual_seed(seed)
    model, _ = load_base_model("tiny-random", data_dir=data_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out)
    for extra in out.iterdir():  # keep only what the store keeps
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    return out
