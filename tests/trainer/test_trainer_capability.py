"""The capability guard: the shipped suite, its answer checks, and a run on the tiny model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from trainer import (
    CAPABILITY_KINDS,
    CapabilityResult,
    CapabilityTask,
    check_answer,
    load_capability_suite,
    load_with_adapters,
    run_capability_suite,
)
from trainer import capability as capability_module

DEGENERATE = ["", "   \n", "I don't know.", "I do not know", "yes yes yes yes", "No idea!", "..."]


def task(kind: str, reference: str = "", **params: Any) -> CapabilityTask:
    return CapabilityTask(f"t-{kind}", kind, "an instruction", params, reference)


@pytest.fixture(scope="module")
def suite() -> list[CapabilityTask]:
    return load_capability_suite()


# -- the shipped suite ----------------------------------------------------------------------


def test_suite_has_enough_distinct_tasks_of_every_kind(suite: list[CapabilityTask]) -> None:
    ids = [t.id for t in suite]
    assert len(ids) >= 80
    assert len(set(ids)) == len(ids)
    per_kind = Counter(t.kind for t in suite)
    assert set(per_kind) == set(CAPABILITY_KINDS)
    assert min(per_kind.values()) >= 8, per_kind


def test_every_reference_answer_passes_its_task(suite: list[CapabilityTask]) -> None:
    failing = [t.id for t in suite if not check_answer(t, t.reference)]
    assert failing == []


def test_tasks_are_single_user_turns(suite: list[CapabilityTask]) -> None:
    for t in suite:
        assert t.messages == [{"role": "user", "content": t.instruction}]


@pytest.mark.parametrize("answer", DEGENERATE)
def test_degenerate_answers_fail_every_task(suite: list[CapabilityTask], answer: str) -> None:
    assert [t.id for t in suite if check_answer(t, answer)] == []


@pytest.mark.parametrize("answer", ["Yes.", "OK", "Sure!", "The answer is:"])
def test_one_word_or_empty_replies_pass_no_task(suite: list[CapabilityTask], answer: str) -> None:
    assert [t.id for t in suite if check_answer(t, answer)] == []


def test_another_tasks_reference_rarely_passes(suite: list[CapabilityTask]) -> None:
    """Checks look at the answer's content, not only its shape: answering a different task of
    the same kind should mostly fail."""
    crossed = passed = 0
    for kind in CAPABILITY_KINDS:
        same = [t for t in suite if t.kind == kind]
        for t, other in zip(same, same[1:] + same[:1], strict=True):
            crossed += 1
            passed += check_answer(t, other.reference)
    assert passed / crossed < 0.35


# -- loading --------------------------------------------------------------------------------


def _load_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rows: list[Any]) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (tmp_path / "data" / "capability_suite.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(capability_module.resources, "files", lambda _package: tmp_path)


GOOD_ROW = {"id": "ok-1", "kind": "fact", "instruction": "Capital of Peru?", "accept": ["Lima"],
            "reference": "Lima"}  # fmt: skip


def test_loader_reads_a_valid_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _load_rows(monkeypatch, tmp_path, [GOOD_ROW])
    (loaded,) = load_capability_suite()
    assert loaded == CapabilityTask(
        "ok-1", "fact", "Capital of Peru?", {"accept": ["Lima"]}, "Lima"
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD_ROW, "id": "bad-kind", "kind": "poem"}, "bad-kind"),
        ({**GOOD_ROW, "id": "no-accept", "accept": []}, "no-accept"),
        ({k: v for k, v in GOOD_ROW.items() if k != "accept"} | {"id": "missing"}, "missing"),
        ({**GOOD_ROW, "id": "extra", "count": 3}, "extra"),
        ({**GOOD_ROW, "id": "bad-ref", "reference": "Quito"}, "bad-ref"),
        ({**GOOD_ROW, "id": "no-instr", "instruction": " "}, "no-instr"),
        (
            {
                "id": "neg",
                "kind": "max_words",
                "instruction": "x",
                "max_words": 0,
                "reference": "a",
            },
            "neg",
        ),
        ("{not json", "line 1"),
    ],
)
def test_loader_names_the_bad_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, row: Any, message: str
) -> None:
    _load_rows(monkeypatch, tmp_path, [row])
    with pytest.raises(ValueError, match=message):
        load_capability_suite()


def test_loader_refuses_duplicate_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _load_rows(monkeypatch, tmp_path, [GOOD_ROW, GOOD_ROW])
    with pytest.raises(ValueError, match=r"ok-1.*duplicate"):
        load_capability_suite()


# -- checks, kind by kind -------------------------------------------------------------------


def test_max_words() -> None:
    t = task("max_words", max_words=12, any_of=["network", "packets"])
    twelve = "A router sends data packets between one network and another one, quickly."
    assert check_answer(t, twelve)
    assert not check_answer(t, twelve.replace("quickly", "very quickly"))  # 13 words
    assert not check_answer(t, "It is a small box with blinking lights.")  # off topic
    assert check_answer(t, "- **Network** device: forwards packets.")  # markup is not words
    one = task("max_words", max_words=1, any_of=["red"])
    assert check_answer(one, "Red.")
    assert not check_answer(one, "Red, I think.")
    assert check_answer(task("max_words", max_words=3), "About 1,000 people.")


def test_required_words() -> None:
    t = task("required_words", words=["cat", "sleeps"])
    assert check_answer(t, "My CAT sleeps all day.")
    assert check_answer(t, "The cat, who never sleeps.")
    assert not check_answer(t, "My cat naps all day.")  # one missing
    assert not check_answer(t, "Cats sleeps a lot.")  # "cats" is not the word "cat"
    assert not check_answer(t, "A concatenation sleeps.")


def test_list_count() -> None:
    t = task("list_count", count=3)
    assert check_answer(t, "- Apple\n- Banana\n- Cherry")
    assert check_answer(t, "Here you go:\n* Apple\n• Banana\n* Cherry\nEnjoy!")
    assert check_answer(t, "1. Apple\n2) Banana\n3. Cherry")
    assert check_answer(t, "1. Apple\n   - green\n   - red\n2. Banana\n3. Cherry")  # sub-items
    assert not check_answer(t, "- Apple\n- Banana\n- Cherry\n- Date")  # 4 items
    assert not check_answer(t, "- Apple\n- Banana")
    assert not check_answer(t, "Apple, banana and cherry.")
    assert not check_answer(t, "- Apple\n- apple\n- Apple")  # one item three times
    assert not check_answer(t, "-Apple\n-Banana\n-Cherry")  # no space: not a bullet


def test_json() -> None:
    t = task("json", keys=["name", "age"], equals={"name": "Ana", "age": 30})
    assert check_answer(t, '{"name": "Ana", "age": 30}')
    assert check_answer(t, 'Sure!\n```json\n{"name": "ana", "age": 30}\n```\nDone.')
    assert check_answer(t, 'Here it is: {"name": "Ana", "age": "30"} as asked.')
    assert not check_answer(t, "{'name': 'Ana', 'age': 30}")  # not JSON
    assert not check_answer(t, '{"name": "Ana", "age": 30,}')
    assert not check_answer(t, '{"name": "Ana"}')  # missing key
    assert not check_answer(t, '{"name": "Ana", "age": 31}')  # wrong value
    assert not check_answer(t, '[{"name": "Ana", "age": 30}]')  # not an object
    bare = task("json")
    assert check_answer(bare, '```\n{"a": 1}\n```')
    assert not check_answer(bare, "The object is {} here.")  # empty object
    flag = task("json", equals={"active": True})
    assert check_answer(flag, '{"active": true}')
    assert not check_answer(flag, '{"active": 1}')


def test_starts_with() -> None:
    t = task("starts_with", phrase="Sure thing")
    assert check_answer(t, "Sure thing! Cats sleep a lot.")
    assert check_answer(t, '  "sure   THING," cats sleep a lot.')
    assert check_answer(t, "**Sure thing**, cats sleep a lot.")
    assert not check_answer(t, "Cats sleep a lot. Sure thing!")
    assert not check_answer(t, "Sure thing!")  # nothing after the phrase
    yes = task("starts_with", phrase="Yes")
    assert not check_answer(yes, "Yesterday it rained.")
    assert check_answer(yes, "Yes, the ocean is salty.")


def test_ends_with() -> None:
    t = task("ends_with", phrase="See you soon")
    assert check_answer(t, "Thanks for dinner, see you soon!")
    assert check_answer(t, 'Thanks for dinner, "See you soon."  ')
    assert not check_answer(t, "See you soon! Thanks for dinner.")
    assert not check_answer(t, "See you soon.")  # only the phrase
    now = task("ends_with", phrase="now")
    assert not check_answer(now, "Look at all that snow.")
    assert check_answer(now, "Come here right now!")


def test_arithmetic() -> None:
    big = task("arithmetic", answer=1000)
    assert check_answer(big, "The sum is 1,000.")
    assert check_answer(big, "1000")
    assert check_answer(big, "It is 1000.0")
    assert not check_answer(big, "The sum is 100.")
    assert not check_answer(big, "one thousand")  # digits were asked for
    t = CapabilityTask(
        "t", "arithmetic", "What is 17 + 25?", {"answer": 42, "distractors": [32]}, "42"
    )
    assert check_answer(t, "17 + 25 = 42.")  # restating the question is fine
    assert not check_answer(t, "17 + 25 = 32.")  # wrong
    assert not check_answer(t, "It is 42 or 43.")  # hedging with the neighbour
    assert not check_answer(t, "Either 32 or 42.")  # a listed wrong answer
    assert not check_answer(t, "It is 420.")


def test_fact() -> None:
    t = task("fact", accept=["8", "eight"])
    assert check_answer(t, "A spider has EIGHT legs.")
    assert check_answer(t, "8 legs")
    assert not check_answer(t, "A spider has six legs.")
    assert not check_answer(t, "Spiders have 18 legs.")
    paris = task("fact", accept=["Paris"])
    assert not check_answer(paris, "It is a Parisian city.")
    assert check_answer(paris, "paris, of course")
    hedge = task("fact", accept=["Canberra"], reject=["Sydney"])
    assert check_answer(hedge, "Canberra.")
    assert not check_answer(hedge, "Sydney or Canberra.")  # a listed wrong answer


# -- running on a model ---------------------------------------------------------------------


def test_run_on_the_tiny_model_checks_every_task(
    data_dir: Path, suite: list[CapabilityTask]
) -> None:
    model, tokenizer = load_with_adapters("tiny-random", {}, data_dir=data_dir)
    subset = suite[::9][:10]
    assert len({t.kind for t in subset}) >= 5

    result = run_capability_suite(
        model, tokenizer, adapter="base", tasks=subset, max_new_tokens=8, batch_size=4
    )

    assert isinstance(result, CapabilityResult)
    assert result.n == len(subset) == 10
    assert list(result.results) == [t.id for t in subset]
    assert result.passed == sum(result.results.values())
    assert result.pass_rate == pytest.approx(result.passed / result.n)
    assert sum(n for _, n in result.by_kind.values()) == result.n
    assert sum(p for p, _ in result.by_kind.values()) == result.passed
    failed = {i for i, ok in result.results.items() if not ok}
    assert len(result.examples) == min(5, len(failed))
    assert all(e["id"] in failed and "instruction" in e and "answer" in e for e in result.examples)
    assert result.duration_s > 0
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()

    again = run_capability_suite(
        model, tokenizer, adapter="base", tasks=subset, max_new_tokens=8, batch_size=4
    )
    assert again.results == result.results  # greedy: the same model gives the same verdicts
