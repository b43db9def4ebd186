"""The capability guard: instructions whose answers code can check, run on base and candidate.

Preference accuracy says whether an adapter learned what a tenant likes; the KL/perplexity
regression says how far it moved. Neither says whether it still *does what it is asked*: an
adapter can learn a tenant's tone and forget to stop at a word limit, to write valid JSON or
that 7 times 8 is 56. This module runs a tenant-independent suite of such instructions with greedy
decoding on any adapter and checks every answer with plain code, so two runs (base and candidate)
can be compared task by task and a candidate that got worse at answering can be refused.

The checks are deliberately strict but fair: case, whitespace and quoting are normalized, but an
empty answer, a refusal ("I don't know") or one word repeated never passes, whatever the task.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

from trainer.generation import generate_answers

__all__ = [
    "CAPABILITY_KINDS",
    "CapabilityResult",
    "CapabilityTask",
    "check_answer",
    "load_capability_suite",
    "run_capability_suite",
]

logger = logging.getLogger(__name__)

_SUITE_FILE = "data/capability_suite.jsonl"
_MAX_EXAMPLES = 5

# A "word" is a run of letters/digits, allowing inner apostrophes and hyphens ("don't",
# "well-known" count once) and number separators ("1,000", "3.5"); markdown bullets,
# punctuation and emoji are not words.
_WORD = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['\-][^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# Answers that decline the task. They must fail even where their length or shape would
# otherwise pass (a 3-word refusal is "at most 12 words").
_REFUSAL = re.compile(
    r"^(?:i\s+(?:really\s+)?(?:don'?t|do\s+not)\s+know|idk|no\s+idea|not\s+sure"
    r"|i'?m\s+not\s+sure|i\s+am\s+not\s+sure|i\s+(?:can'?t|cannot|am\s+unable\s+to)\s+"
    r"(?:answer|help|say|do\s+that)|i'?m\s+unable\s+to|as\s+an\s+ai\b|unknown\W*$|n/a\W*$)"
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019*_"
_TRAILING_PUNCT = ".!?,;:\u2026" + _QUOTES + ")]"
_LIST_ITEM = re.compile(r"^(?P<indent>[ \t]*)(?:[-*\u2022]|\d{1,2}[.)])[ \t]+(?P<text>\S.*)$")
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(?P<body>.*?)```", re.DOTALL)
# Digits with optional comma thousands separators ("1,000") and an optional decimal part.
# Unsigned: no task of the suite has a negative result, and "17-25" is not minus 25.
_NUMBER = re.compile(r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _has_words(items: Any) -> bool:
    return (
        isinstance(items, list)
        and bool(items)
        and all(isinstance(w, str) and w.strip() for w in items)
    )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


# kind -> (required params, optional params, validator of the params dict)
_KINDS: dict[str, tuple[frozenset[str], frozenset[str], Callable[[Mapping[str, Any]], bool]]] = {
    "max_words": (
        frozenset({"max_words"}),
        frozenset({"min_words", "any_of"}),
        lambda p: (
            _is_int(p["max_words"], 1)
            and _is_int(p.get("min_words", 1), 1)
            and p.get("min_words", 1) <= p["max_words"]
            and ("any_of" not in p or _has_words(p["any_of"]))
        ),
    ),
    "required_words": (
        frozenset({"words"}),
        frozenset(),
        lambda p: _has_words(p["words"]),
    ),
    "list_count": (
        frozenset({"count"}),
        frozenset(),
        lambda p: _is_int(p["count"], 1),
    ),
    "json": (
        frozenset(),
        frozenset({"keys", "equals"}),
        lambda p: (
            ("keys" not in p or _has_words(p["keys"]))
            and ("equals" not in p or (isinstance(p["equals"], dict) and bool(p["equals"])))
        ),
    ),
    "starts_with": (
        frozenset({"phrase"}),
        frozenset(),
        lambda p: isinstance(p["phrase"], str) and bool(_words(p["phrase"])),
    ),
    "ends_with": (
        frozenset({"phrase"}),
        frozenset(),
        lambda p: isinstance(p["phrase"], str) and bool(_words(p["phrase"])),
    ),
    "arithmetic": (
        frozenset({"answer"}),
        frozenset({"distractors"}),
        lambda p: (
            _is_number(p["answer"])
            and (
                "distractors" not in p
                or (isinstance(p["distractors"], list) and all(map(_is_number, p["distractors"])))
            )
        ),
    ),
    "fact": (
        frozenset({"accept"}),
        frozenset({"reject"}),
        lambda p: _has_words(p["accept"]) and ("reject" not in p or _has_words(p["reject"])),
    ),
}

CAPABILITY_KINDS: tuple[str, ...] = tuple(_KINDS)
"""Every kind of task :func:`check_answer` knows how to check."""


@dataclass(frozen=True)
class CapabilityTask:
    """One instruction of the suite and the parameters of its check."""

    id: str
    """Stable across releases of the suite, so stored results can be compared task by task."""
    kind: str
    """One of :data:`CAPABILITY_KINDS`; selects the check."""
    instruction: str
    """The whole user message."""
    params: dict[str, Any]
    """The check's parameters (e.g. ``{"max_words": 12}``), validated at load time."""
    reference: str
    """An answer that passes; the loader refuses a task whose reference fails its own check."""

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation to generate from: the instruction as the only user turn."""
        return [{"role": "user", "content": self.instruction}]


def _task_from_row(row: Any, line: int) -> CapabilityTask:
    if not isinstance(row, dict):
        raise ValueError(f"capability suite line {line}: expected a JSON object")
    task_id = row.get("id")
    if not isinstance(task_id, str) or not task_id.strip():
        raise ValueError(f"capability suite line {line}: missing or empty 'id'")
    kind = row.get("kind")
    if kind not in _KINDS:
        raise ValueError(
            f"capability task {task_id!r}: unknown kind {kind!r}, expected one of "
            f"{', '.join(CAPABILITY_KINDS)}"
        )
    for key in ("instruction", "reference"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"capability task {task_id!r}: missing or empty {key!r}")
    params = {k: v for k, v in row.items() if k not in {"id", "kind", "instruction", "reference"}}
    required, optional, valid = _KINDS[kind]
    missing = required - params.keys()
    unknown = params.keys() - required - optional
    if missing or unknown:
        raise ValueError(
            f"capability task {task_id!r} ({kind}): missing {sorted(missing)}, "
            f"unknown {sorted(unknown)}"
        )
    if not valid(params):
        raise ValueError(f"capability task {task_id!r} ({kind}): invalid parameters {params}")
    task = CapabilityTask(task_id, kind, row["instruction"], params, row["reference"])
    if not check_answer(task, task.reference):
        raise ValueError(f"capability task {task_id!r}: its reference fails its own check")
    return task


def load_capability_suite() -> list[CapabilityTask]:
    """The suite shipped with the package, validated: a bad row is a ``ValueError`` naming it.

    Validating on load (kinds, parameters, unique ids, references that pass) means a typo in the
    suite fails the first run loudly instead of silently making a task impossible to pass.
    """
    text = resources.files("trainer").joinpath(_SUITE_FILE).read_text("utf-8")
    tasks: list[CapabilityTask] = []
    seen: set[str] = set()
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"capability suite line {line}: not JSON ({exc})") from exc
        task = _task_from_row(row, line)
        if task.id in seen:
            raise ValueError(f"capability task {task.id!r}: duplicate id")
        seen.add(task.id)
        tasks.append(task)
    return tasks


# -- checks ---------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(text.translate(_APOSTROPHES).split())


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text.translate(_APOSTROPHES))]


def _degenerate(answer: str) -> bool:
    """Empty, a refusal, or one word over and over: no task may pass with these."""
    words = _words(answer)
    if not words:
        return True
    if len(words) > 1 and len(set(words)) == 1:
        return True
    return bool(_REFUSAL.match(_normalize(answer).casefold().lstrip(_QUOTES + " ")))


def _contains(text: str, phrase: str) -> bool:
    """``phrase`` occurs in ``text`` as whole words, ignoring case and spacing."""
    words = _words(phrase)
    if not words:
        return False
    pattern = r"(?<![^\W_])" + r"\W+".join(re.escape(w) for w in words) + r"(?![^\W_])"
    return re.search(pattern, text.translate(_APOSTROPHES).casefold()) is not None


def _check_max_words(p: Mapping[str, Any], answer: str) -> bool:
    n = len(_words(answer))
    if not p.get("min_words", 1) <= n <= p["max_words"]:
        return False
    return "any_of" not in p or any(_contains(answer, w) for w in p["any_of"])


def _check_required_words(p: Mapping[str, Any], answer: str) -> bool:
    return all(_contains(answer, w) for w in p["words"])


def _check_list_count(p: Mapping[str, Any], answer: str) -> bool:
    items: list[tuple[int, str]] = []
    for line in answer.splitlines():
        m = _LIST_ITEM.match(line.expandtabs(4))
        if m and _words(m["text"]):
            items.append((len(m["indent"]), " ".join(_words(m["text"]))))
    if not items:
        return False
    # Sub-items are part of their parent item, not items of the list.
    top = min(indent for indent, _ in items)
    texts = [text for indent, text in items if indent == top]
    # The same item N times is not a list of N things.
    return len(texts) == p["count"] and len(set(texts)) == len(texts)


def _json_objects(answer: str) -> list[Any]:
    """Every candidate JSON value in the answer: fenced blocks first, then the bare text, then
    each object that starts at a ``{``."""
    found: list[Any] = []
    decoder = json.JSONDecoder()
    for block in [m["body"] for m in _FENCE.finditer(answer)] + [answer]:
        try:
            found.append(json.loads(block))
            continue
        except json.JSONDecodeError:
            pass
        for start in [i for i, ch in enumerate(block) if ch == "{"]:
            try:
                value, _ = decoder.raw_decode(block, start)
            except json.JSONDecodeError:
                continue
            found.append(value)
    return found


def _same_value(expected: Any, got: Any) -> bool:
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected is got
    if isinstance(expected, int | float):
        if isinstance(got, str):
            numbers = _numbers(got)
            return len(numbers) == 1 and numbers[0] == Decimal(str(expected))
        return isinstance(got, int | float) and Decimal(str(got)) == Decimal(str(expected))
    if isinstance(expected, str):
        return (
            isinstance(got, str) and _normalize(got).casefold() == _normalize(expected).casefold()
        )
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(_same_value(e, g) for e, g in zip(expected, got, strict=True))
        )
    return bool(expected == got)


def _check_json(p: Mapping[str, Any], answer: str) -> bool:
    for value in _json_objects(answer):
        if not isinstance(value, dict) or not value:
            continue
        if not all(k in value for k in p.get("keys", ())):
            continue
        if all(k in value and _same_value(v, value[k]) for k, v in p.get("equals", {}).items()):
            return True
    return False


def _check_starts_with(p: Mapping[str, Any], answer: str) -> bool:
    text = _normalize(answer).lstrip(_QUOTES + " #>").casefold()
    phrase = _normalize(p["phrase"]).strip(_QUOTES + " ").casefold()
    if not text.startswith(phrase):
        return False
    rest = text[len(phrase) :]
    if phrase[-1:].isalnum() and rest[:1].isalnum():  # "Yes" is not the start of "Yesterday"
        return False
    return bool(_words(rest))


def _check_ends_with(p: Mapping[str, Any], answer: str) -> bool:
    text = _normalize(answer).rstrip(_TRAILING_PUNCT + " ").casefold()
    phrase = _normalize(p["phrase"]).strip(_QUOTES + " ").rstrip(_TRAILING_PUNCT + " ").casefold()
    if not text.endswith(phrase):
        return False
    rest = text[: len(text) - len(phrase)]
    if phrase[:1].isalnum() and rest[-1:].isalnum():  # "now" is not the end of "snow"
        return False
    return bool(_words(rest))


def _numbers(text: str) -> list[Decimal]:
    out: list[Decimal] = []
    for m in _NUMBER.finditer(text):
        try:
            out.append(Decimal(m.group().replace(",", "")))
        except InvalidOperation:  # pragma: no cover - the pattern only matches digits
            continue
    return out


def _check_arithmetic(p: Mapping[str, Any], answer: str, instruction: str) -> bool:
    correct = Decimal(str(p["answer"]))
    found = set(_numbers(answer))
    if correct not in found:
        return False
    # Hedging ("42 or 43", a run of numbers around the answer) must not pass: the listed wrong
    # answers and the off-by-one neighbours fail the task, unless the instruction itself has
    # them (the model may restate the question).
    given = set(_numbers(instruction))
    wrong = {Decimal(str(d)) for d in p.get("distractors", ())} | {correct - 1, correct + 1}
    return not (found & (wrong - given - {correct}))


def _check_fact(p: Mapping[str, Any], answer: str) -> bool:
    if any(_contains(answer, r) for r in p.get("reject", ())):
        return False
    return any(_contains(answer, a) for a in p["accept"])


def check_answer(task: CapabilityTask, answer: str) -> bool:
    """Whether ``answer`` does what ``task`` asked. Pure and deterministic.

    Every kind first rejects degenerate answers (empty, a refusal, one word repeated), so a
    model cannot pass a task by saying nothing, whatever its shape.
    """
    if _degenerate(answer):
        return False
    p = task.params
    if task.kind == "max_words":
        return _check_max_words(p, answer)
    if task.kind == "required_words":
        return _check_required_words(p, answer)
    if task.kind == "list_count":
        return _check_list_count(p, answer)
    if task.kind == "json":
        return _check_json(p, answer)
    if task.kind == "starts_with":
        return _check_starts_with(p, answer)
    if task.kind == "ends_with":
        return _check_ends_with(p, answer)
    if task.kind == "arithmetic":
        return _check_arithmetic(p, answer, task.instruction)
    if task.kind == "fact":
        return _check_fact(p, answer)
    raise ValueError(f"capability task {task.id!r}: unknown kind {task.kind!r}")


# -- running --------------------------------------------------------------------------------


@dataclass
class CapabilityResult:
    """One adapter's run of the suite (``to_dict`` is JSON-safe)."""

    n: int
    passed: int
    pass_rate: float
    """``passed / n``; 0.0 for an empty suite."""
    results: dict[str, bool] = field(default_factory=dict)
    """Task id → passed, so a candidate's run can be compared with the base's task by task."""
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    """Kind → ``[passed, n]``: which ability moved, not just that the total did."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    """Up to five failed tasks with the instruction and the answer, for people to read."""
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "passed": self.passed,
            "pass_rate": self.pass_rate,
            "results": dict(self.results),
            "by_kind": {k: list(v) for k, v in self.by_kind.items()},
            "examples": [dict(e) for e in self.examples],
            "duration_s": self.duration_s,
        }


def run_capability_suite(
    model: Any,
    tokenizer: Any,
    *,
    adapter: str,
    tasks: Sequence[CapabilityTask] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> CapabilityResult:
    """Answer every task greedily with ``adapter`` active (``"base"``: none) and check each.

    Greedy decoding makes the run reproducible, so base and candidate differ only by the adapter.
    ``tasks`` defaults to the shipped suite; ``on_batch(done, total)`` follows the generation.
    """
    started = time.monotonic()
    suite = list(tasks) if tasks is not None else load_capability_suite()
    answers = generate_answers(
        model,
        tokenizer,
        [t.messages for t in suite],
        adapter=adapter,
        temperature=0.0,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    result = CapabilityResult(n=len(suite), passed=0, pass_rate=0.0)
    for task, (answer,) in zip(suite, answers, strict=True):
        ok = check_answer(task, answer)
        result.results[task.id] = ok
        counts = result.by_kind.setdefault(task.kind, [0, 0])
        counts[0] += int(ok)
        counts[1] += 1
        if ok:
            result.passed += 1
        elif len(result.examples) < _MAX_EXAMPLES:
            result.examples.append(
                {
                    "id": task.id,
                    "kind": task.kind,
                    "instruction": task.instruction,
                    "answer": answer,
                }
            )
    result.pass_rate = result.passed / result.n if result.n else 0.0
    result.duration_s = round(time.monotonic() - started, 3)
    logger.info(
        "capability suite on %s: %d/%d passed in %.1fs",
        adapter,
        result.passed,
        result.n,
        result.duration_s,
    )
    return result
