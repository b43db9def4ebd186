"""Feedback compiler: thumbs on answers → DPO pairs, KTO examples and GRPO prompts.

Pipeline, in this order (so nothing unscrubbed can reach a dataset):

1. scrub PII from every message, completion and correction;
2. normalize whitespace;
3. dedupe identical (prompt, completion, rating) votes and resolve conflicting votes on the same
   answer by majority (ties are dropped);
4. split by a hash of the normalized prompt (a prompt stays in its split as data grows);
5. build the three datasets and a data card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from trainer.control_tokens import neutralize_control_tokens
from trainer.errors import InvalidFeedback, NotEnoughData, OneSidedFeedback

__all__ = [
    "HOLDOUT_FRACTION",
    "CompiledDataset",
    "DataCard",
    "FeedbackRecord",
    "KTOExample",
    "PreferencePair",
    "compile_feedback",
    "load_compiled",
    "normalize_text",
    "prompt_key",
    "read_feedback_jsonl",
    "scrub_pii",
    "write_jsonl",
]

logger = logging.getLogger(__name__)

Message = dict[str, str]

_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class FeedbackRecord:
    """One rated answer: the shape of a ``feedback`` row joined with its ``interaction``."""

    messages: Sequence[Mapping[str, str]]
    """The conversation the answer replied to (``role``/``content`` dicts, oldest first)."""
    completion: str
    """The assistant answer that was rated."""
    rating: int
    """+1 (thumbs up) or -1 (thumbs down)."""
    correction: str | None = None
    """An answer the user wrote instead; it is preferred to ``completion``."""
    user_id: str | None = None
    """The end user who voted (opaque; only used for counts)."""
    created_at: datetime | None = None
    interaction_id: str | None = None
    score: float | None = None
    """Optional graded score next to the thumb; kept for future methods, unused today."""

    def __post_init__(self) -> None:
        if self.rating not in (1, -1):
            raise InvalidFeedback(f"rating must be 1 or -1, got {self.rating!r}")
        if not self.messages:
            raise InvalidFeedback("messages must hold at least one message (the user's prompt)")
        for m in self.messages:
            if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise InvalidFeedback(
                    f"each message needs a role in {sorted(_ROLES)} and a string content, got {m!r}"
                )
        if not isinstance(self.completion, str):
            raise InvalidFeedback("completion must be a string")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeedbackRecord:
        """Build a record from the JSON shape of ``POST /v1/feedback`` items.

        Accepts ``messages`` (list of role/content) or ``prompt`` (a string, taken as one user
        message); ``rating`` as 1/-1, ``"up"``/``"down"`` or a bool.
        """
        if not isinstance(data, Mapping):
            raise InvalidFeedback(
                f"a feedback record must be a JSON object, got {type(data).__name__}"
            )
        messages: Any = data.get("messages")
        if messages is None and isinstance(data.get("prompt"), str):
            messages = [{"role": "user", "content": data["prompt"]}]
        if not isinstance(messages, list):
            raise InvalidFeedback(
                "a feedback record needs 'messages' (a list) or 'prompt' (a string)"
            )
        completion = data.get("completion")
        if not isinstance(completion, str):
            raise InvalidFeedback(
                "a feedback record needs 'completion' (the rated answer, a string)"
            )
        created = data.get("created_at")
        created_at: datetime | None
        if isinstance(created, datetime) or created is None:
            created_at = created
        else:
            try:
                created_at = datetime.fromisoformat(str(created))
            except ValueError as exc:
                raise InvalidFeedback(f"created_at is not ISO 8601: {created!r}") from exc
        correction = data.get("correction")
        return cls(
            messages=[{"role": str(m.get("role")), "content": m.get("content")} for m in messages],
            completion=completion,
            rating=_parse_rating(data.get("rating")),
            correction=correction if isinstance(correction, str) and correction.strip() else None,
            user_id=None if data.get("user_id") is None else str(data["user_id"]),
            created_at=created_at,
            interaction_id=None
            if data.get("interaction_id") is None
            else str(data["interaction_id"]),
            score=None if data.get("score") is None else float(data["score"]),
        )


def _parse_rating(value: Any) -> int:
    if isinstance(value, bool):
        return 1 if value else -1
    if value in (1, -1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in {"up", "down", "1", "-1", "+1"}:
        return -1 if value.strip().lower() in {"down", "-1"} else 1
    raise InvalidFeedback(f"rating must be 1/-1 or 'up'/'down', got {value!r}")


# ---------------------------------------------------------------------------------------------
# PII scrubbing
# ---------------------------------------------------------------------------------------------

# Order matters: secrets first (they contain digit runs and '@'-free tokens), then e-mails,
# then card numbers (Luhn-checked) before phone numbers (a card would otherwise look like one).
_SECRET_PATTERNS: tuple[re.Pattern[str], ...] = (
    # OpenAI/Stripe style (sk-proj-..., rk-live-...). The dash-separated segments are bounded: an
    # unbounded `(?:\w+-)*` backtracks over every earlier segment, quadratic in "sk-sk-sk-...".
    re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9_]{1,40}-){0,4}[A-Za-z0-9_]{16,}"),
    re.compile(r"\b(?:tl|sk|pk|rk|whsec)_[A-Za-z0-9_]{16,}"),  # tuneloop, Stripe
    re.compile(r"\b(?:ghp|gho|ghu|ghs|github_pat)_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JWT
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}"),
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),  # long hex: hashes used as tokens, keys
)
# Long base64-ish runs that mix letters and digits are treated as secrets; plain long words are not.
_B64_CANDIDATE = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/=_-])")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
"""What an e-mail address looks like. Scrubbing does not run it over the text (every start of
"a.a.a..." would scan to the end: quadratic); it is matched around each "@" instead."""
_EMAIL_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,5}){1,4}(?!\w)"
    r"|(?<![\w+])\+\d{7,15}(?!\w)"
)
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _scrub_emails(text: str, tally: Counter[str]) -> str:
    """``_EMAIL`` replaced in time linear in the text: each "@" looks back over at most 64
    local-part characters (RFC 5321's limit) and forward over its domain, which ends at the next
    character a domain cannot hold (the next "@" among them)."""
    out: list[str] = []
    done = 0  # text[:done] is already in ``out``
    at = text.find("@")
    while at != -1:
        start = at
        while start > done and at - start < 64 and text[start - 1] in _EMAIL_LOCAL_CHARS:
            start -= 1
        # `\b`: the address starts at a word boundary, the first one in the run (after "ü" in
        # "Jürgen.m@x.de", the pattern's match is ".m@x.de").
        while start < at and not _boundary(text, start):
            start += 1
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if start < at and domain is not None:
            tally["email"] += 1
            out += (text[done:start], "[EMAIL]")
            done = domain.end()
            at = text.find("@", done)
        else:
            at = text.find("@", at + 1)
    return "".join(out) + text[done:] if out else text


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _boundary(text: str, i: int) -> bool:
    """Whether ``\b`` holds before ``text[i]``."""
    before = i > 0 and _word_char(text[i - 1])
    return before != _word_char(text[i])


def scrub_pii(text: str, counts: Counter[str] | None = None) -> str:
    """Replace e-mails, phone numbers, card numbers and secrets with ``[KIND]`` placeholders.

    ``counts`` (if given) is incremented per kind found: ``email``, ``phone``, ``card``, ``secret``.
    """
    tally: Counter[str] = counts if counts is not None else Counter()

    def sub(pattern: re.Pattern[str], kind: str, s: str) -> str:
        def repl(_m: re.Match[str]) -> str:
            tally[kind] += 1
            return f"[{kind.upper()}]"

        return pattern.sub(repl, s)

    for pattern in _SECRET_PATTERNS:
        text = sub(pattern, "secret", text)

    def b64_repl(m: re.Match[str]) -> str:
        token = m.group(0)
        if re.search(r"\d", token) and re.search(r"[A-Za-z]", token):
            tally["secret"] += 1
            return "[SECRET]"
        return token

    text = _B64_CANDIDATE.sub(b64_repl, text)
    text = _scrub_emails(text, tally)

    def card_repl(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            tally["card"] += 1
            return "[CARD]"
        return m.group(0)

    text = _CARD_CANDIDATE.sub(card_repl, text)

    def phone_repl(m: re.Match[str]) -> str:
        raw = m.group(0)
        digits = re.sub(r"\D", "", raw)
        if not 7 <= len(digits) <= 15 or _DATE_LIKE.match(raw.strip()):
            return raw
        tally["phone"] += 1
        return "[PHONE]"

    return _PHONE_CANDIDATE.sub(phone_repl, text)


# ---------------------------------------------------------------------------------------------
# Normalization and keys
# ---------------------------------------------------------------------------------------------

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Collapse runs of spaces, trim every line, keep at most one blank line, strip the ends.

    Line breaks survive: they carry structure (lists, code) that preferences are often about.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def _clean(text: str, pii: Counter[str]) -> str:
    """What training may see of a text: PII scrubbed, control tokens neutralized, normalized."""
    return normalize_text(neutralize_control_tokens(scrub_pii(text, pii)))


def prompt_key(messages: Sequence[Mapping[str, str]]) -> str:
    """A stable hex key of a (normalized) conversation prefix."""
    canonical = json.dumps(
        [[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _in_holdout(key: str, fraction: float, salt: str) -> bool:
    # 64 bits of the salted hash, mapped to [0, 1): independent of the rest of the data, so a
    # prompt never changes split when more feedback arrives.
    h = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------
# Output types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """A DPO / reward-model pair: the same prompt, a preferred and a dispreferred answer."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = "thumbs"
    """``thumbs`` (an up-voted vs a down-voted answer) or ``correction``."""

    def to_trl(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass(frozen=True)
class KTOExample:
    """An unpaired thumb: a prompt, an answer and whether it was desirable."""

    prompt: list[Message]
    completion: str
    label: bool

    def to_trl(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "completion": [{"role": "assistant", "content": self.completion}],
            "label": self.label,
        }


@dataclass(frozen=True)
class DataCard:
    """What went into a compiled dataset; stored with the dataset row and shown to admins."""

    records_in: int
    records_used: int
    duplicates_removed: int
    empty_dropped: int
    conflicts_dropped: int
    thumbs_up: int
    thumbs_down: int
    corrections: int
    users: int
    prompts: int
    holdout_prompts: int
    pairs_train: int
    pairs_holdout: int
    kto_train: int
    kto_holdout: int
    grpo_train: int
    grpo_holdout: int
    up_rate: float
    desirable_weight: float
    undesirable_weight: float
    holdout_fraction: float
    pii_found: dict[str, int]
    content_hash: str
    eval_prompts: int = 0
    """Questions served but never rated, kept for evaluation only (no method trains on them)."""
    records_left_out: int = 0
    """The oldest feedback past the compile's row or size budget (the newest is kept)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompiledDataset:
    """Train and holdout splits for every method, plus the data card."""

    pairs_train: list[PreferencePair]
    pairs_holdout: list[PreferencePair]
    kto_train: list[KTOExample]
    kto_holdout: list[KTOExample]
    grpo_train: list[list[Message]]
    grpo_holdout: list[list[Message]]
    card: DataCard
    eval_prompts: list[list[Message]] = field(default_factory=list)
    """Questions from the tenant's traffic that nobody rated, unlike any rated one: the judge's
    win rate has far more of them than held-out rated questions (most answers get no thumb)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def desirable_weight(self) -> float:
        return self.card.desirable_weight

    @property
    def undesirable_weight(self) -> float:
        return self.card.undesirable_weight


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


def _kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    # TRL's KTO guidance: keep desirable_weight * n_desirable / (undesirable_weight *
    # n_undesirable) within [1, 4/3]. Up-weight the scarcer side rather than down-weight data.
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < 1.0:
        return round(n_undesirable / n_desirable, 4), 1.0
    if ratio > 4 / 3:
        return 1.0, round(n_desirable / (n_undesirable * 4 / 3), 4)
    return 1.0, 1.0


HOLDOUT_FRACTION = 0.3
"""Share of questions held out. Real logs are sparse (one answer per question, half rated), and
the gate needs a few liked and a few disliked held-out answers to read anything: at 0.2 a
tenant with 80 thumbs kept a dozen, and the rarer side often fell under four."""


def compile_feedback(
    records: Iterable[FeedbackRecord],
    *,
    holdout_fraction: float = HOLDOUT_FRACTION,
    min_records: int = 8,
    max_pairs_per_prompt: int = 4,
    split_salt: str = "tuneloop-holdout-v1",
    unrated: Iterable[Sequence[Mapping[str, str]]] = (),
    max_eval_prompts: int = 256,
) -> CompiledDataset:
    """Compile rated answers into DPO pairs, KTO examples and GRPO prompts.

    ``unrated`` are conversations the tenant served that got no feedback; up to
    ``max_eval_prompts`` of them (scrubbed, deduplicated, none a rated question) become
    ``eval_prompts``.

    Raises :class:`NotEnoughData` when fewer than ``min_records`` distinct votes remain after
    dedupe, and :class:`OneSidedFeedback` when every vote has the same rating and there is no
    correction to contrast with.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    records = list(records)
    if not records:
        raise NotEnoughData("no feedback yet: collect thumbs on answers before training")

    pii: Counter[str] = Counter()
    # prompt key -> normalized messages; (key, completion) -> votes
    prompts: dict[str, list[Message]] = {}
    votes: dict[tuple[str, str], list[int]] = defaultdict(list)
    seen: set[tuple[str, str, int, str | None]] = set()
    corrections: dict[tuple[str, str], str] = {}
    users: set[str] = set()
    duplicates = 0
    empty = 0

    for rec in records:
        messages = [{"role": m["role"], "content": _clean(m["content"], pii)} for m in rec.messages]
        completion = _clean(rec.completion, pii)
        correction = _clean(rec.correction, pii) if rec.correction is not None else None
        if not completion or not any(m["content"] for m in messages):
            empty += 1  # nothing left after normalization: nothing to learn from
            continue
        key = prompt_key(messages)
        prompts[key] = messages
        if rec.user_id is not None:
            users.add(rec.user_id)
        # The same user voting the same way on the same answer twice is one vote.
        vote_id = (key, completion, rec.rating, rec.user_id)
        if vote_id in seen and rec.user_id is not None:
            duplicates += 1
            continue
        seen.add(vote_id)
        if rec.user_id is None and votes[(key, completion)].count(rec.rating) > 0:
            duplicates += 1
            continue
        votes[(key, completion)].append(rec.rating)
        if correction and correction != completion:
            corrections[(key, completion)] = correction

    # Resolve each distinct answer to one label by majority; ties carry no signal.
    ups: dict[str, list[str]] = defaultdict(list)
    downs: dict[str, list[str]] = defaultdict(list)
    conflicts = 0
    n_up = n_down = 0
    for (key, completion), vs in votes.items():
        total = sum(vs)
        n_up += vs.count(1)
        n_down += vs.count(-1)
        if total > 0:
            ups[key].append(completion)
        elif total < 0:
            downs[key].append(completion)
        else:
            conflicts += 1
    used = sum(len(v) for v in ups.values()) + sum(len(v) for v in downs.values())

    if used == 0:
        raise NotEnoughData(
            "no usable feedback after dedupe and conflict resolution: every answer had as many "
            "up-votes as down-votes; collect more feedback"
        )
    if used + len(corrections) < min_records:
        raise NotEnoughData(
            f"only {used} distinct rated answers after dedupe (need at least {min_records}); "
            "collect more feedback or lower the policy's minimum"
        )
    if (not ups or not downs) and not corrections:
        side = "up" if ups else "down"
        raise OneSidedFeedback(
            f"all {used} rated answers are thumbs-{side}: preference training needs both "
            "up- and down-votes (or corrections); collect feedback on weaker answers too"
        )

    pairs: dict[bool, list[PreferencePair]] = {False: [], True: []}
    kto: dict[bool, list[KTOExample]] = {False: [], True: []}
    grpo: dict[bool, list[list[Message]]] = {False: [], True: []}
    holdout_keys: set[str] = set()
    for key in sorted(prompts):
        messages = prompts[key]
        hold = _in_holdout(key, holdout_fraction, split_salt)
        if hold:
            holdout_keys.add(key)
        grpo[hold].append(messages)
        good = sorted(ups.get(key, []))
        bad = sorted(downs.get(key, []))
        prompt_pairs = [PreferencePair(messages, c, r, "thumbs") for c in good for r in bad][
            :max_pairs_per_prompt
        ]
        for (ckey, completion), corrected in sorted(corrections.items()):
            if ckey == key:
                prompt_pairs.insert(
                    0, PreferencePair(messages, corrected, completion, "correction")
                )
        pairs[hold].extend(prompt_pairs[: max(max_pairs_per_prompt, 1)])
        kto[hold].extend(KTOExample(messages, c, True) for c in good)
        kto[hold].extend(KTOExample(messages, c, False) for c in bad)
        kto[hold].extend(
            KTOExample(messages, corrected, True)
            for (ckey, _), corrected in sorted(corrections.items())
            if ckey == key and corrected not in good
        )

    eval_prompts: list[list[Message]] = []
    seen_keys = set(prompts)  # a rated question is never an evaluation-only one
    for conversation in unrated:
        if len(eval_prompts) >= max_eval_prompts:
            break
        messages = [{"role": m["role"], "content": _clean(m["content"], pii)} for m in conversation]
        key = prompt_key(messages)
        if key not in seen_keys and any(m["content"] for m in messages):
            seen_keys.add(key)
            eval_prompts.append(messages)

    n_des = sum(ex.label for ex in kto[False])
    n_und = len(kto[False]) - n_des
    d_w, u_w = _kto_weights(n_des, n_und)

    body = {
        "pairs_train": [asdict(p) for p in pairs[False]],
        "pairs_holdout": [asdict(p) for p in pairs[True]],
        "kto_train": [asdict(k) for k in kto[False]],
        "kto_holdout": [asdict(k) for k in kto[True]],
        "grpo_train": grpo[False],
        "grpo_holdout": grpo[True],
        "eval_prompts": eval_prompts,
    }
    content_hash = hashlib.sha256(
        json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()

    card = DataCard(
        records_in=len(records),
        records_used=used,
        duplicates_removed=duplicates,
        empty_dropped=empty,
        conflicts_dropped=conflicts,
        thumbs_up=n_up,
        thumbs_down=n_down,
        corrections=len(corrections),
        users=len(users),
        prompts=len(prompts),
        holdout_prompts=len(holdout_keys),
        pairs_train=len(pairs[False]),
        pairs_holdout=len(pairs[True]),
        kto_train=len(kto[False]),
        kto_holdout=len(kto[True]),
        grpo_train=len(grpo[False]),
        grpo_holdout=len(grpo[True]),
        up_rate=round(n_up / (n_up + n_down), 4) if n_up + n_down else 0.0,
        desirable_weight=d_w,
        undesirable_weight=u_w,
        holdout_fraction=holdout_fraction,
        pii_found=dict(sorted(pii.items())),
        content_hash=content_hash,
        eval_prompts=len(eval_prompts),
    )
    logger.info(
        "compiled %d records: %d pairs, %d KTO examples, %d prompts (%d held out), PII %s",
        card.records_in,
        card.pairs_train + card.pairs_holdout,
        card.kto_train + card.kto_holdout,
        card.prompts,
        card.holdout_prompts,
        card.pii_found or "none",
    )
    return CompiledDataset(
        pairs_train=pairs[False],
        pairs_holdout=pairs[True],
        kto_train=kto[False],
        kto_holdout=kto[True],
        grpo_train=grpo[False],
        grpo_holdout=grpo[True],
        card=card,
        eval_prompts=eval_prompts,
    )


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

_FILES = {
    "pairs_train": "dpo_train.jsonl",
    "pairs_holdout": "dpo_holdout.jsonl",
    "kto_train": "kto_train.jsonl",
    "kto_holdout": "kto_holdout.jsonl",
    "grpo_train": "grpo_train.jsonl",
    "grpo_holdout": "grpo_holdout.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
}
DATA_CARD_FILE = "data_card.json"


def write_jsonl(dataset: CompiledDataset, out_dir: Path) -> dict[str, Path]:
    """Write every split as JSONL (TRL's conversational format) plus ``data_card.json``.

    Returns the written paths by split name. :func:`load_compiled` reads them back.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for attr, name in _FILES.items():
        rows: list[Any] = getattr(dataset, attr)
        path = out_dir / name
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                obj = row.to_trl() if hasattr(row, "to_trl") else {"prompt": row}
                if isinstance(row, PreferencePair):
                    obj["source"] = row.source
                fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        written[attr] = path
    card_path = out_dir / DATA_CARD_FILE
    card_path.write_text(json.dumps(dataset.card.to_dict(), indent=2, sort_keys=True) + "\n")
    written["card"] = card_path
    return written


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_compiled(directory: Path) -> CompiledDataset:
    """Read a dataset written by :func:`write_jsonl`."""
    card_path = directory / DATA_CARD_FILE
    if not card_path.exists():
        raise NotEnoughData(f"{directory} holds no compiled dataset ({DATA_CARD_FILE} is missing)")
    card = DataCard(**json.loads(card_path.read_text()))

    def pairs(name: str) -> list[PreferencePair]:
        return [
            PreferencePair(
                r["prompt"],
                r["chosen"][0]["content"],
                r["rejected"][0]["content"],
                r.get("source", "thumbs"),
            )
            for r in _read_rows(directory / name)
        ]

    def kto(name: str) -> list[KTOExample]:
        return [
            KTOExample(r["prompt"], r["completion"][0]["content"], bool(r["label"]))
            for r in _read_rows(directory / name)
        ]

    return CompiledDataset(
        pairs_train=pairs(_FILES["pairs_train"]),
        pairs_holdout=pairs(_FILES["pairs_holdout"]),
        kto_train=kto(_FILES["kto_train"]),
        kto_holdout=kto(_FILES["kto_holdout"]),
        grpo_train=[r["prompt"] for r in _read_rows(directory / _FILES["grpo_train"])],
        grpo_holdout=[r["prompt"] for r in _read_rows(directory / _FILES["grpo_holdout"])],
        card=card,
        eval_prompts=[r["prompt"] for r in _read_rows(directory / _FILES["eval_prompts"])],
    )


def read_feedback_jsonl(path: Path) -> list[FeedbackRecord]:
    """Read feedback records, one JSON object per line (see :meth:`FeedbackRecord.from_dict`)."""
    records: list[FeedbackRecord] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(FeedbackRecord.from_dict(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InvalidFeedback(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            except InvalidFeedback as exc:
                raise InvalidFeedback(f"{path}:{lineno}: {exc}") from exc
    return records
