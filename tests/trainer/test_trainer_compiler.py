"""The feedback compiler: normalization, dedupe, pairs, KTO balance, PII, holdout, files."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer import (
    FeedbackRecord,
    InvalidFeedback,
    NotEnoughData,
    OneSidedFeedback,
    compile_feedback,
    load_compiled,
    read_feedback_jsonl,
    scrub_pii,
    write_jsonl,
)
from trainer.compiler import _EMAIL, _scrub_emails, normalize_text, prompt_key

Factory = Callable[..., list[FeedbackRecord]]


def _msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_pairs_kto_and_prompts_from_balanced_thumbs(records_factory: Factory) -> None:
    ds = compile_feedback(records_factory(48), holdout_fraction=0.25)
    card = ds.card
    assert card.prompts == 48
    assert card.pairs_train + card.pairs_holdout == 48
    assert card.kto_train + card.kto_holdout == 96
    assert card.grpo_train + card.grpo_holdout == 48
    assert 0 < card.holdout_prompts < 48
    assert card.up_rate == 0.5
    for pair in ds.pairs_train:
        assert pair.chosen.startswith("Sure!") and pair.rejected.startswith("No.")
    # No prompt is in both splits.
    train_keys = {prompt_key(p.prompt) for p in ds.pairs_train}
    hold_keys = {prompt_key(p.prompt) for p in ds.pairs_holdout}
    assert train_keys and hold_keys and not train_keys & hold_keys


def test_whitespace_normalized_and_duplicates_removed() -> None:
    recs = [
        FeedbackRecord(
            _msg("Hello   there\r\n\r\n\r\n  friend "), "Yes  sir.\n\n\n\n- a\n- b", 1, user_id="a"
        ),
        FeedbackRecord(
            _msg("Hello there\n\nfriend"), "Yes sir.\n\n- a\n- b ", 1, user_id="a"
        ),  # dup
        FeedbackRecord(_msg("Hello there\n\nfriend"), "Nope.", -1, user_id="b"),
    ]
    ds = compile_feedback(recs, min_records=1, holdout_fraction=0.0)
    assert ds.card.duplicates_removed == 1
    assert ds.card.prompts == 1
    assert ds.pairs_train[0].prompt == _msg("Hello there\n\nfriend")
    assert ds.pairs_train[0].chosen == "Yes sir.\n\n- a\n- b"  # line breaks (lists) survive
    assert normalize_text("  a \t b  \n\n\n\n c ") == "a b\n\nc"


def test_conflicting_votes_resolved_by_majority_and_ties_dropped() -> None:
    p = _msg("Which color?")
    recs = [
        FeedbackRecord(p, "Blue.", 1, user_id="a"),
        FeedbackRecord(p, "Blue.", 1, user_id="b"),
        FeedbackRecord(p, "Blue.", -1, user_id="c"),  # outvoted: Blue stays up
        FeedbackRecord(p, "Red.", 1, user_id="a"),
        FeedbackRecord(p, "Red.", -1, user_id="b"),  # tie: Red carries no signal
        FeedbackRecord(p, "Green.", -1, user_id="a"),
    ]
    ds = compile_feedback(recs, min_records=1, holdout_fraction=0.0)
    assert ds.card.conflicts_dropped == 1
    assert [(x.chosen, x.rejected) for x in ds.pairs_train] == [("Blue.", "Green.")]
    assert {(k.completion, k.label) for k in ds.kto_train} == {("Blue.", True), ("Green.", False)}


def test_correction_becomes_chosen_over_the_rated_answer() -> None:
    p = _msg("Translate hello to French")
    recs = [
        FeedbackRecord(p, "Hola", -1, correction="Bonjour", user_id="a"),
        FeedbackRecord(_msg("Other"), "x", -1, user_id="a"),
    ]
    # Every vote is a thumbs-down, but the correction gives a contrast: not one-sided.
    ds = compile_feedback(recs, min_records=1, holdout_fraction=0.0)
    pairs = [(x.chosen, x.rejected, x.source) for x in ds.pairs_train]
    assert pairs == [("Bonjour", "Hola", "correction")]
    assert ("Bonjour", True) in {(k.completion, k.label) for k in ds.kto_train}


def test_kto_weights_follow_trl_balance_rule(records_factory: Factory) -> None:
    recs = records_factory(30) + records_factory(30, good="Certainly, here you go.", down=False)
    ds = compile_feedback(recs, holdout_fraction=0.0)
    n_des = sum(k.label for k in ds.kto_train)
    n_und = len(ds.kto_train) - n_des
    assert n_des == 2 * n_und
    ratio = ds.desirable_weight * n_des / (ds.undesirable_weight * n_und)
    assert 1.0 <= ratio <= 4 / 3 + 1e-6
    assert ds.undesirable_weight > 1.0  # the scarcer side is up-weighted


def test_empty_feedback_is_not_enough_data() -> None:
    with pytest.raises(NotEnoughData) as info:
        compile_feedback([])
    assert info.value.code == "not_enough_data"


def test_one_sided_feedback(records_factory: Factory) -> None:
    with pytest.raises(OneSidedFeedback) as info:
        compile_feedback(records_factory(20, down=False))
    assert info.value.code == "one_sided_feedback"
    assert "thumbs-up" in str(info.value)
    assert isinstance(info.value, NotEnoughData)  # a business outcome, like too little data


def test_too_few_records(records_factory: Factory) -> None:
    with pytest.raises(NotEnoughData, match="need at least 8"):
        compile_feedback(records_factory(3))


def test_only_tied_votes_is_not_enough_data() -> None:
    p = _msg("q")
    recs = [FeedbackRecord(p, "a", 1, user_id="x"), FeedbackRecord(p, "a", -1, user_id="y")]
    with pytest.raises(NotEnoughData):
        compile_feedback(recs, min_records=1)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+tag@example.co.uk today", "email"),
        ("call me on +1 415 555 0132", "phone"),
        ("my number is (415) 555-0132", "phone"),
        ("ring +441234567890", "phone"),
        ("card 4111 1111 1111 1111 exp 12/29", "card"),
        ("card 5500-0000-0000-0004", "card"),
        ("key sk-proj-AbCdEf1234567890XyZ12345", "secret"),
        ("tenant key tl_live_abcdefghijklmnop1234", "secret"),
        ("stripe sk_test_51Habcdefghijklmnopqrstuv", "secret"),
        ("token 3f786850e387550fdab836ed7e6dc881de23001b", "secret"),
        ("blob dGhpcyBpcyBhIHNlY3JldCB0b2tlbiAxMjM0NTY3ODkw==", "secret"),
        ("auth: Bearer abcdefghijklmnopqrstuvwxyz123456", "secret"),
    ],
)
def test_pii_is_scrubbed(text: str, kind: str) -> None:
    counts: Counter[str] = Counter()
    out = scrub_pii(text, counts)
    assert f"[{kind.upper()}]" in out
    assert counts[kind] == 1


# What one product key could post to stall the compile: repeated prefixes of the secret, JWT and
# e-mail patterns, which a backtracking pattern rescans from every start (8 KiB of "sk-" took
# 140 ms, 64 KiB 13 s).
ADVERSARIAL_UNITS = [
    "sk-",
    "sk-a",
    "a.",
    "1.",
    "a-",
    "+1-",
    "a@",
    "@a.",
    "eyJaaaaaaaaaaaa.aaaa",
    "1 (",
]


@pytest.mark.parametrize("unit", ADVERSARIAL_UNITS)
def test_scrubbing_time_is_linear_in_adversarial_text(unit: str) -> None:
    def seconds(n: int) -> float:
        text = (unit * (n // len(unit) + 1))[:n]
        t0 = time.perf_counter()
        scrub_pii(text)
        return time.perf_counter() - t0

    small, big = seconds(16_000), seconds(256_000)
    # 16x the text: linear work takes ~16x the time (measured 0.02-0.07 s for 64 KiB), quadratic
    # work 256x. The absolute bound keeps a noisy machine from failing a linear scrubber.
    assert big < 2.0, f"{unit!r}: 256 KB took {big:.2f} s"
    assert big < 60 * max(small, 0.002), f"{unit!r}: {small:.4f} s -> {big:.4f} s"


def test_linear_email_scrubbing_finds_what_the_pattern_finds() -> None:
    # The scrubber matches around each "@" instead of running `_EMAIL` over the text; on random
    # text made of the characters an address is made of, both replace exactly the same spans.
    rng = random.Random(0)
    alphabet = "ab1.@-_ +%xX\n(ü"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert _scrub_emails(text, Counter()) == _EMAIL.sub("[EMAIL]", text), text


@pytest.mark.parametrize(
    "text",
    [
        "On 2024-01-15 we shipped version 1.2.3 to 1,000,000 users.",
        "Order #12345 costs 19.99 and pi is 3.14159265.",
        "A card-like number that fails Luhn: 1234 5678 9012 3456.",
        "Steps:\n1. Open it\n2. Click save",
        "internationalization_is_a_long_word_made_of_letters_only",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    counts: Counter[str] = Counter()
    assert scrub_pii(text, counts) == text
    assert not counts


def test_pii_never_reaches_the_written_dataset(tmp_path: Path, records_factory: Factory) -> None:
    secret_bits = ["bob@corp.example", "4111 1111 1111 1111", "sk-live-abcdefghijklmnop123456"]
    recs = records_factory(10)
    p = _msg(f"my email is {secret_bits[0]}, card {secret_bits[1]}")
    recs += [
        FeedbackRecord(p, f"Use key {secret_bits[2]} to log in", 1, user_id="a"),
        FeedbackRecord(
            p, "Email bob@corp.example for help", -1, user_id="b", correction="Ask support."
        ),
    ]
    ds = compile_feedback(recs, holdout_fraction=0.3)
    # Occurrences across records: the shared prompt is counted once per record.
    assert ds.card.pii_found == {"card": 2, "email": 3, "secret": 1}
    write_jsonl(ds, tmp_path)
    blob = "".join(p.read_text() for p in tmp_path.iterdir())
    for bit in secret_bits:
        assert bit not in blob


def test_holdout_split_is_stable_as_data_grows(records_factory: Factory) -> None:
    small = compile_feedback(records_factory(32), holdout_fraction=0.3)
    big = compile_feedback(records_factory(96), holdout_fraction=0.3)
    small_hold = {prompt_key(p) for p in small.grpo_holdout}
    small_train = {prompt_key(p) for p in small.grpo_train}
    big_hold = {prompt_key(p) for p in big.grpo_holdout}
    big_train = {prompt_key(p) for p in big.grpo_train}
    assert small_hold and small_hold <= big_hold
    assert small_train <= big_train
    # The split is a hash, not a shuffle: the held-out share is near the fraction.
    assert 0.15 < len(big_hold) / 96 < 0.45


def test_content_hash_tracks_content(records_factory: Factory) -> None:
    a = compile_feedback(records_factory(12))
    b = compile_feedback(list(reversed(records_factory(12))))
    c = compile_feedback(records_factory(12, good="Something else entirely."))
    assert a.card.content_hash == b.card.content_hash  # order of arrival does not matter
    assert a.card.content_hash != c.card.content_hash


def test_unrated_questions_are_kept_for_evaluation_only(records_factory: Factory) -> None:
    records = records_factory(16)
    rated = records[0].messages
    unrated = [
        _msg("Which plant needs the least water?"),
        _msg("Which  plant needs the least water? "),  # the same question, spaced differently
        rated,  # rated elsewhere: never an evaluation-only question
        _msg("Write to me at ann@corp.example: which tea is mildest?"),
        _msg("   "),
        *(_msg(f"Unrated question {i}?") for i in range(10)),
    ]
    ds = compile_feedback(records, unrated=unrated, max_eval_prompts=5)
    texts = [p[0]["content"] for p in ds.eval_prompts]
    assert texts[:2] == [
        "Which plant needs the least water?",
        "Write to me at [EMAIL]: which tea is mildest?",
    ]
    assert len(texts) == ds.card.eval_prompts == 5  # capped
    assert ds.card.pii_found == {"email": 1}
    # Nothing trains on them, and the training splits are what they were without them.
    plain = compile_feedback(records)
    assert (ds.kto_train, ds.pairs_train, ds.grpo_train) == (
        plain.kto_train,
        plain.pairs_train,
        plain.grpo_train,
    )
    assert ds.card.prompts == plain.card.prompts


def test_write_and_load_round_trip(tmp_path: Path, records_factory: Factory) -> None:
    ds = compile_feedback(records_factory(16), unrated=[_msg("Never rated?")])
    paths = write_jsonl(ds, tmp_path / "ds")
    first = json.loads(paths["pairs_train"].read_text().splitlines()[0])
    assert first["chosen"][0]["role"] == "assistant"  # TRL's conversational format
    back = load_compiled(tmp_path / "ds")
    assert back.pairs_train == ds.pairs_train
    assert back.kto_holdout == ds.kto_holdout
    assert back.grpo_holdout == ds.grpo_holdout
    assert back.eval_prompts == ds.eval_prompts == [_msg("Never rated?")]
    assert back.card == ds.card


def test_feedback_jsonl_accepts_the_api_shapes(tmp_path: Path) -> None:
    path = tmp_path / "fb.jsonl"
    lines = [
        {"prompt": "Hi?", "completion": "Hello!", "rating": "up", "user_id": 7},
        {
            "messages": _msg("Hi?"),
            "completion": "Go away",
            "rating": -1,
            "created_at": "2025-01-31T12:00:00+00:00",
            "correction": "Hello there!",
        },
        {"prompt": "Hi?", "completion": "Hey", "rating": True},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = read_feedback_jsonl(path)
    assert [r.rating for r in recs] == [1, -1, 1]
    assert recs[0].user_id == "7" and recs[1].correction == "Hello there!"
    assert recs[1].created_at is not None and recs[1].created_at.year == 2025


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "q", "completion": "a", "rating": 5}', "rating"),
        ('{"completion": "a", "rating": 1}', "messages"),
        ('{"prompt": "q", "rating": 1}', "completion"),
        (
            '{"messages": [{"role": "wizard", "content": "x"}], "completion": "a", "rating": 1}',
            "role",
        ),
    ],
)
def test_bad_feedback_lines_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "fb.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine", "rating": 1}\n' + line + "\n")
    with pytest.raises(InvalidFeedback, match=match) as info:
        read_feedback_jsonl(path)
    assert ":2:" in str(info.value)
