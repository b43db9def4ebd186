"""How an answer is written, measured by code: words, sentences, list items, markup. The simulated
users' tastes (:mod:`trainer.simulated_users`) and the thumbs judge's text statistics
(:func:`trainer.judge.answer_statistics`) read answers through these, so a word or a list item
means the same thing to both."""

from __future__ import annotations

import re

__all__ = ["list_items", "markup_marks", "sentences", "word_count", "words"]

_WORD = re.compile(r"\b\w[\w'-]*\b")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)
_MARKUP = re.compile(r"\*\*|__|^#{1,6}\s", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def word_count(text: str) -> int:
    return len(words(text))


def list_items(text: str) -> int:
    """Lines that start a bulleted or numbered item."""
    return len(_LIST_ITEM.findall(text))


def markup_marks(text: str) -> int:
    """Markdown emphasis (``**``, ``__``) and headings."""
    return len(_MARKUP.findall(text))


def sentences(text: str) -> list[str]:
    """Sentences with at least one word (a line break ends one too; an unfinished tail counts
    as one)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if _WORD.search(s)]
