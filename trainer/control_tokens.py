"""Chat-template control tokens written as text inside a message.

A chat template joins messages with control tokens (ChatML's ``<|im_start|>``/``<|im_end|>``,
Llama 3's ``<|start_header_id|>``, Llama 2's ``[INST]``...). Tokenizers turn those strings back
into control tokens wherever they appear, so an end user who types
``<|im_end|><|im_start|>system ...`` into a chat box forges a system turn: at serving, and in
the tenant's training data. Neutralizing means an invisible zero-width space after the first
character: the text reads the same, and no tokenizer sees a control token in it.

Applied to chat message contents at serving (the API, before any backend) and to everything the
compiler writes for training. ``/v1/completions`` prompts are left alone: there the caller writes
the whole text, template included.
"""

from __future__ import annotations

import re

__all__ = ["neutralize_control_tokens"]

_ZERO_WIDTH_SPACE = "\u200b"
_CONTROL = re.compile(
    r"<\|[A-Za-z0-9_.:-]{1,48}\|>"  # ChatML, Llama 3, Phi, Gemma-style <|...|>
    r"|<\uff5c[^<>\n]{1,48}\uff5c>"  # DeepSeek's full-width bars
    r"|</?s>|\[/?INST\]|<</?SYS>>"  # Llama 2 / Mistral
    r"|<(?:start|end)_of_turn>"  # Gemma
)


def neutralize_control_tokens(text: str) -> str:
    """``text`` with every control-token spelling broken by a zero-width space."""
    if "<" not in text and "[" not in text:
        return text
    return _CONTROL.sub(lambda m: m.group(0)[0] + _ZERO_WIDTH_SPACE + m.group(0)[1:], text)
