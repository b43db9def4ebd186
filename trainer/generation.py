"""Loading a base model with named LoRA adapters, generating answers and scoring answers.

Shared by evaluation (candidate vs current vs base in one resident model) and the simulated users.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from trainer._quiet import quiet_hf
from trainer.base_models import load_base_model
from trainer.errors import CorruptAdapter
from trainer.training import verify_adapter

__all__ = [
    "BASE",
    "answer_features",
    "answer_logprobs",
    "generate_answers",
    "load_with_adapters",
    "token_kl_and_nll",
    "use_adapter",
]

logger = logging.getLogger(__name__)

BASE = "base"
"""The adapter name that means "no adapter" in this module's helpers."""

Messages = Sequence[Mapping[str, str]]


def load_with_adapters(
    base_model: str,
    adapters: Mapping[str, Path],
    *,
    data_dir: Path,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load the base model once with every adapter in ``adapters`` (name → directory).

    Returns ``(model, tokenizer)``; the model is a ``PeftModel`` when ``adapters`` is non-empty.
    Adapters are checked first: a missing, unreadable or mismatching one is :class:`CorruptAdapter`.
    """
    for path in adapters.values():
        verify_adapter(path)
    model, tokenizer = load_base_model(base_model, data_dir=data_dir, device=device)
    if not adapters:
        return model, tokenizer
    from peft import PeftModel

    peft_model: Any = None
    for name, path in adapters.items():
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the base model")
        try:
            with quiet_hf():
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
                else:
                    peft_model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CorruptAdapter(
                f"adapter {path} does not fit base model {base_model!r}: {exc}"
            ) from exc
    peft_model.eval()
    return peft_model, tokenizer


@contextmanager
def use_adapter(model: Any, name: str) -> Iterator[None]:
    """Run the block with adapter ``name`` active (``BASE``: all adapters off)."""
    if name == BASE:
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        with ctx:
            yield
        return
    model.set_adapter(name)
    yield


def _render(tokenizer: Any, messages: Messages, answer: str | None) -> str:
    conv = [dict(m) for m in messages]
    if answer is None:
        text: str = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    else:
        conv.append({"role": "assistant", "content": answer})
        text = tokenizer.apply_chat_template(conv, tokenize=False)
    return text


def _encode_pairs(
    tokenizer: Any, items: Sequence[tuple[Messages, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids of prompt+answer and the index where the answer starts."""
    out: list[tuple[list[int], int]] = []
    for messages, answer in items:
        prompt_ids = tokenizer(_render(tokenizer, messages, None), add_special_tokens=False)[
            "input_ids"
        ]
        full_ids = tokenizer(_render(tokenizer, messages, answer), add_special_tokens=False)[
            "input_ids"
        ]
        start = min(len(prompt_ids), len(full_ids) - 1)
        if len(full_ids) > max_length:  # keep the answer, drop the oldest prompt tokens
            cut = len(full_ids) - max_length
            full_ids = full_ids[cut:]
            start = max(1, start - cut)
        out.append((full_ids, start))
    return out


def _closing_length(tokenizer: Any, messages: Messages) -> int:
    """How many tokens the chat template puts after an assistant answer (ChatML: end-of-turn and
    a newline), measured by rendering an empty answer."""
    opened = tokenizer(_render(tokenizer, messages, None), add_special_tokens=False)["input_ids"]
    closed = tokenizer(_render(tokenizer, messages, ""), add_special_tokens=False)["input_ids"]
    return max(0, len(closed) - len(opened))


def _model_batches(
    model: Any,
    tokenizer: Any,
    encoded: list[tuple[list[int], int]],
    batch_size: int,
    **kwargs: Any,
) -> Iterator[tuple[Any, Any, list[tuple[list[int], int]]]]:
    """Right-padded batches of ``encoded`` through the model without gradients:
    ``(model output, input_ids, chunk)``; ``kwargs`` go to the model call."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with torch.no_grad():
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
        yield out, input_ids, chunk


def _forward_batches(
    model: Any, tokenizer: Any, encoded: list[tuple[list[int], int]], batch_size: int
) -> Iterator[tuple[Any, Any, list[tuple[list[int], int]]]]:
    import torch

    for out, input_ids, chunk in _model_batches(model, tokenizer, encoded, batch_size):
        yield torch.log_softmax(out.logits.float(), dim=-1).cpu(), input_ids, chunk


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[Messages, str]],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[tuple[float, int]]:
    """Sum of log-probabilities of each answer given its conversation, and its token count."""
    encoded = _encode_pairs(tokenizer, items, max_length)
    results: list[tuple[float, int]] = []
    for logp, input_ids, chunk in _forward_batches(model, tokenizer, encoded, batch_size):
        for row, (ids, start) in enumerate(chunk):
            targets = input_ids[row, start : len(ids)]
            picked = logp[row, start - 1 : len(ids) - 1].gather(-1, targets.unsqueeze(-1))
            results.append((float(picked.sum()), len(ids) - start))
    return results


def answer_features(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[Messages, str]],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    beat: Callable[[int, int], None] | None = None,
) -> list[list[float]]:
    """A fixed-size description of each answer in its conversation, from the model's own hidden
    states: the mean over the answer's tokens at the middle and the last layer, the last
    layer's state at the end of the turn (which has read the whole answer), and the log of the
    answer's token count. Run it with adapters off: a judge needs features that do not move
    with the candidate it judges. ``beat(done, total)`` is called after each batch.
    """
    encoded = _encode_pairs(tokenizer, items, max_length)
    rows: list[list[float]] = []
    for out, _, chunk in _model_batches(
        model, tokenizer, encoded, batch_size, output_hidden_states=True
    ):
        states = out.hidden_states
        middle, last = states[len(states) // 2].float().cpu(), states[-1].float().cpu()
        for row, (ids, start) in enumerate(chunk):
            answer = slice(start, len(ids))
            rows.append(
                middle[row, answer].mean(0).tolist()
                + last[row, answer].mean(0).tolist()
                + last[row, len(ids) - 1].tolist()
                + [math.log1p(len(ids) - start)]
            )
        if beat is not None:
            beat(len(rows), len(encoded))
    return rows


def token_kl_and_nll(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[Messages, str]],
    *,
    adapter: str,
    batch_size: int = 8,
    max_length: int = 512,
) -> tuple[float, float, float]:
    """Mean per-token KL(base ‖ adapter) over the answers' text, and both models' mean token NLL.

    Returns ``(kl, nll_base, nll_adapter)``; perplexity is ``exp(nll)``. The chat template's
    end-of-turn tokens after each answer are not scored: whether to stop after one sentence is
    exactly what a tenant's length preference changes, and counting it would report a "detailed"
    tenant's adapter as forgetting when it only answers at more length.
    """
    encoded = _encode_pairs(tokenizer, items, max_length)
    closing = [_closing_length(tokenizer, messages) for messages, _ in items]
    kl_sum = nll_base = nll_adapter = 0.0
    n_tokens = 0
    base_batches = []
    with use_adapter(model, BASE):
        base_batches = list(_forward_batches(model, tokenizer, encoded, batch_size))
    with use_adapter(model, adapter):
        adapted = list(_forward_batches(model, tokenizer, encoded, batch_size))
    item = 0
    for (lp_b, input_ids, chunk), (lp_a, _, _) in zip(base_batches, adapted, strict=True):
        for row, (ids, start) in enumerate(chunk):
            end = max(start + 1, len(ids) - closing[item])
            item += 1
            sl = slice(start - 1, end - 1)
            b, a = lp_b[row, sl], lp_a[row, sl]
            kl_sum += float((b.exp() * (b - a)).sum())
            targets = input_ids[row, start:end].unsqueeze(-1)
            nll_base -= float(b.gather(-1, targets).sum())
            nll_adapter -= float(a.gather(-1, targets).sum())
            n_tokens += end - start
    if n_tokens == 0:
        return math.nan, math.nan, math.nan
    return kl_sum / n_tokens, nll_base / n_tokens, nll_adapter / n_tokens


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    *,
    adapter: str | None = None,
    num_answers: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """``num_answers`` answers per prompt (greedy when ``temperature`` is 0).

    ``adapter`` names a loaded adapter (``BASE`` for none); ``None`` uses the model as it is.
    ``on_batch(done, total)`` is called after each batch (long evaluations heartbeat with it).
    """
    import torch

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    do_sample = temperature > 0
    texts = [_render(tokenizer, p, None) for p in prompts]
    answers: list[list[str]] = []
    ctx = use_adapter(model, adapter) if adapter is not None else nullcontext()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with ctx:
            for i in range(0, len(texts), batch_size):
                chunk = texts[i : i + batch_size]
                batch = tokenizer(
                    chunk, return_tensors="pt", padding=True, add_special_tokens=False
                ).to(next(model.parameters()).device)
                kwargs: dict[str, Any] = {
                    "max_new_tokens": max_new_tokens,
                    "do_sample": do_sample,
                    "num_return_sequences": num_answers,
                    "pad_token_id": tokenizer.pad_token_id,
                    "eos_token_id": tokenizer.eos_token_id,
                }
                if do_sample:
                    kwargs.update(temperature=temperature, top_p=0.95, top_k=0)
                else:
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                with torch.no_grad():
                    out = model.generate(**batch, **kwargs)
                new = out[:, batch["input_ids"].shape[1] :]
                decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
                for j in range(len(chunk)):
                    answers.append(
                        [d.strip() for d in decoded[j * num_answers : (j + 1) * num_answers]]
                    )
                if on_batch is not None:
                    on_batch(len(answers), len(texts))
    finally:
        torch.random.set_rng_state(generator_state)
        tokenizer.padding_side = padding_side
    return answers
