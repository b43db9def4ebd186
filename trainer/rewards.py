"""GRPO's rewards: what the tenant's users like, as its thumbs judge predicts it, plus an
optional reward checked by code for being an answer at all.

The judge (:mod:`trainer.judge`) is learned from the tenant's own unpaired thumbs, so GRPO needs
no preference pairs, which real logs rarely have. It may reward answers only once it has shown,
on thumbs it never saw, that it tells liked from disliked ones (``JudgeQuality.trusted``); a
judge near chance would train the adapter on noise. Its features come from a frozen copy of the
base model, so the policy being trained cannot move the judge that scores it.

A judge learned from a hundred thumbs can be fooled: the policy may find answers it scores
highly that no user would like (empty, one word over and over). The code-checked reward pays for
answers that are answers at all; TRL's ``beta`` keeps the policy near the base; and every candidate
still faces the gate's capability suite, KL and perplexity bounds.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainer.base_models import load_base_model
from trainer.compiler import CompiledDataset
from trainer.judge import JudgeQuality, ThumbsJudge, fit_or_load

__all__ = ["JudgeReward", "TenantJudge", "answer_check", "load_or_fit_judge"]

logger = logging.getLogger(__name__)

Beat = Callable[[int, int], None]


def _messages(prompt: Any) -> list[Mapping[str, str]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _text(completion: Any) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": ...}]``."""
    return str(completion[-1]["content"] if isinstance(completion, list) else completion)


class JudgeReward:
    """The trusted judge's P(up) for each sampled answer (a TRL reward function)."""

    __name__ = "judge"  # TRL logs ``rewards/judge/mean``

    def __init__(
        self,
        judge: ThumbsJudge,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        beat: Beat | None = None,
    ) -> None:
        self.judge, self.model, self.tokenizer = judge, model, tokenizer
        self.batch_size = batch_size
        self.beat = beat
        """Called with ``(step, 0)`` after each group is scored: generation is where a GRPO
        step spends its time, so this is the generation phase's heartbeat."""

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kw: Any
    ) -> list[float]:
        items = [(_messages(p), _text(c)) for p, c in zip(prompts, completions, strict=True)]
        scores = self.judge.probabilities(
            self.model, self.tokenizer, items, batch_size=self.batch_size
        )
        if self.beat is not None:
            state = kw.get("trainer_state")
            self.beat(int(getattr(state, "global_step", 0)), 0)
        return scores


_WORD = re.compile(r"[^\W_]+")


def _no_answer(answer: str) -> bool:
    """Nothing but spaces and punctuation, one word over and over, or one word making more than
    half of a longer answer (a generation stuck in a loop). A refusal or "I'm not sure" is an
    answer: the judge, not this check, says whether users like it."""
    words = [w.casefold() for w in _WORD.findall(answer)]
    if not words:
        return True
    top = Counter(words).most_common(1)[0][1]
    return (len(words) > 1 and top == len(words)) or (len(words) >= 4 and top / len(words) > 0.5)


def answer_check(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """1 for an answer, 0 for what is none (:func:`_no_answer`). Cheap, checked by code, and
    blind to what the judge is blind to."""
    return [0.0 if _no_answer(_text(c)) else 1.0 for c in completions]


answer_check.__name__ = "answer_check"


class TenantJudge:
    """The judge GRPO would reward with, or why it may not: ``judge`` is set only when trusted."""

    def __init__(
        self,
        quality: JudgeQuality,
        judge: ThumbsJudge | None,
        model: Any,
        tokenizer: Any,
        *,
        reused: bool,
        tokens: int,
    ) -> None:
        self.quality = quality
        self.judge = judge if judge is not None and quality.trusted else None
        self.model, self.tokenizer = model, tokenizer
        self.reused = reused
        """Loaded from an earlier attempt of this run (a retry does not fit it again)."""
        self.tokens = tokens
        """Tokens of the conversations the judge read to fit and check itself (metered)."""


def load_or_fit_judge(
    *,
    base_model: str,
    data: CompiledDataset,
    path: Path,
    data_dir: Path,
    min_auroc: float,
    seed: int = 0,
    device: str | None = None,
    beat: Beat | None = None,
) -> TenantJudge:
    """The tenant's thumbs judge for this data (:func:`trainer.judge.fit_or_load`), on a frozen
    copy of the base model loaded for it and kept for the reward."""
    model, tokenizer = load_base_model(base_model, data_dir=data_dir, device=device)
    model.eval()
    model.requires_grad_(False)
    tokens = _conversation_tokens(
        tokenizer, [(ex.prompt, ex.completion) for ex in (*data.kto_train, *data.kto_holdout)]
    )
    judge, reused = fit_or_load(
        model,
        tokenizer,
        base_model=base_model,
        data=data,
        path=path,
        min_auroc=min_auroc,
        seed=seed,
        beat=beat,
    )
    if isinstance(judge, JudgeQuality):
        return TenantJudge(judge, None, model, tokenizer, reused=reused, tokens=tokens)
    return TenantJudge(judge.quality, judge, model, tokenizer, reused=reused, tokens=tokens)


def _conversation_tokens(
    tokenizer: Any, items: Sequence[tuple[Sequence[Mapping[str, str]], str]]
) -> int:
    total = 0
    for messages, answer in items:
        conversation = [dict(m) for m in messages] + [{"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(conversation, tokenize=True)
        total += len(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    return total
