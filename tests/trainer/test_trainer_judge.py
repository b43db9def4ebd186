"""The tenant's thumbs judge: learns what a tenant's users like from unpaired thumbs, and is
allowed to decide only when it separates held-out thumbs it never saw."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import WORDS, short_or_long
from trainer import KTOExample, ThumbsJudge, load_base_model, train_thumbs_judge
from trainer.judge import (
    HIDDEN,
    STATISTICS,
    TEXT,
    JudgeQuality,
    answer_statistics,
    fit_or_load,
)


def _thumbs(n: int, *, seed: int, noise: bool = False) -> list[KTOExample]:
    """Unpaired thumbs on one answer per question: users like short answers (or, with
    ``noise``, vote at random)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        short = rng.random() < 0.5
        answer = short_or_long(rng, short=short)
        label = rng.random() < 0.5 if noise else short
        prompt = [{"role": "user", "content": f"question {seed}-{i}: how do I fix thing {i % 7}?"}]
        out.append(KTOExample(prompt, answer, label))
    return out


@pytest.fixture(scope="module")
def tiny(data_dir: Path) -> tuple[object, object]:
    return load_base_model("tiny-random", data_dir=data_dir)


def test_judge_learns_a_taste_and_may_decide(tiny: tuple[object, object], tmp_path: Path) -> None:
    model, tokenizer = tiny
    judge = train_thumbs_judge(
        model,
        tokenizer,
        base_model="tiny-random",
        train=_thumbs(60, seed=1),
        holdout=_thumbs(30, seed=2),
    )
    assert isinstance(judge, ThumbsJudge)
    q = judge.quality
    assert q.trusted, q.reason
    assert q.auroc is not None and q.auroc.value >= 0.9 and q.auroc.n == 90  # 60 + 30
    assert q.brier is not None and q.brier < 0.25 and q.n_train == 60
    prompt = [{"role": "user", "content": "question x: how do I fix thing 3?"}]
    short, long = judge.probabilities(
        model, tokenizer, [(prompt, "the cat sat."), (prompt, " ".join(["the warm sun"] * 12))]
    )
    assert short > 0.5 > long
    judge.save(tmp_path / "judge.json")
    again = ThumbsJudge.load(tmp_path / "judge.json")
    assert again.probabilities(model, tokenizer, [(prompt, "the cat sat.")]) == pytest.approx(
        [short]
    )
    assert again.quality.auroc == q.auroc


def _layout_thumbs(n: int, *, seed: int) -> list[KTOExample]:
    """Users who like answers laid out as a list; the words are the same either way, so only
    the layout tells a liked answer from a disliked one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        steps = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7))) for _ in range(3)]
        listed = rng.random() < 0.5
        answer = "\n".join(f"- {s}." for s in steps) if listed else " ".join(f"{s}." for s in steps)
        prompt = [{"role": "user", "content": f"question {seed}-{i}: how do I do thing {i % 5}?"}]
        out.append(KTOExample(prompt, answer, listed))
    return out


def test_statistics_describe_how_an_answer_is_written() -> None:
    def stats(answer: str) -> dict[str, float]:
        return dict(zip(STATISTICS, answer_statistics(answer), strict=True))

    listed = stats("Steps:\n1. Rinse the rice.\n2. Boil it, then simmer for 12 min.")
    assert listed["list items"] == 2 and listed["lines"] == 3 and listed["digits per word"] > 0
    assert listed["ends a sentence"] == 1 and listed["bold and heading marks"] == 0
    prose = stats("Rinse the rice well. Then boil it and simmer it until it is done, or")
    assert prose["list items"] == 0 and prose["lines"] == 1
    assert prose["words per sentence"] == pytest.approx(7.5)  # 15 words, 2 sentences
    assert prose["ends a sentence"] == 0  # cut off mid-sentence
    assert stats("**Note:** ok")["bold and heading marks"] == 2
    assert set(stats("").values()) == {0.0}


def test_judge_chooses_the_description_that_predicts_the_thumbs(
    tiny: tuple[object, object], tmp_path: Path
) -> None:
    """A taste for layout is plain in the text statistics (the tiny model's hidden states see it
    too, and tie: a tie goes to the twelve numbers): the report says which was chosen, and such
    a judge scores answers without running the model at all."""
    model, tokenizer = tiny
    judge = train_thumbs_judge(
        model,
        tokenizer,
        base_model="tiny-random",
        train=_layout_thumbs(60, seed=1),
        holdout=_layout_thumbs(30, seed=2),
    )
    assert isinstance(judge, ThumbsJudge)
    assert judge.features == TEXT and judge.quality.features == TEXT
    assert judge.quality.trusted and "learned on text statistics" in judge.quality.reason
    prompt = [{"role": "user", "content": "question x: how do I do thing 1?"}]
    listed, prose = judge.probabilities(
        None,  # no model: text statistics need none
        None,
        [
            (prompt, "- warm sun.\n- cold rain.\n- the cat."),
            (prompt, "Warm sun. Cold rain. The cat."),
        ],
    )
    assert listed > 0.5 > prose
    judge.save(tmp_path / "judge.json")
    assert ThumbsJudge.load(tmp_path / "judge.json").features == TEXT


@pytest.mark.parametrize("signal", [HIDDEN, TEXT])
def test_cross_validation_picks_the_description_that_carries_the_taste(signal: str) -> None:
    """Not the first in line: whichever description holds the signal wins, the other is noise."""
    import numpy as np

    from trainer.judge import _fit_probe

    rng = np.random.default_rng(5)
    y = np.array([0, 1] * 40)
    noise = rng.normal(size=(80, 12))
    carries = rng.normal(size=(80, 12))
    carries[:, 0] += 1.5 * y
    described = {TEXT: noise, HIDDEN: noise.copy()}
    described[signal] = carries
    chosen, probe = _fit_probe(described, y, 5, seed=0)
    assert chosen == signal
    assert probe.predict_proba(carries)[:, 1][y == 1].mean() > 0.6


def test_a_judge_file_from_before_the_choice_is_hidden_states_and_is_refitted(
    tiny: tuple[object, object], tmp_path: Path
) -> None:
    import json

    from trainer.compiler import compile_feedback
    from trainer.simulated_users import get_persona, realistic_feedback

    model, tokenizer = tiny
    path = tmp_path / "judge.json"
    old = {
        "kind": "thumbs_judge",
        "base_model": "tiny-random",
        "bias": 0.0,
        "quality": {"trusted": False, "reason": "an older release"},
    }
    path.write_text(json.dumps({**old, "weights": [0.0] * 10, "meta": {}}))
    assert ThumbsJudge.load(path).features == HIDDEN
    path.write_text(json.dumps({**old, "weights": [], "features": "vibes"}))
    with pytest.raises(ValueError, match="unknown judge features 'vibes'"):
        ThumbsJudge.load(path)
    # A run's saved judge is reused only when it was fitted in this format on the same data.
    rng = random.Random(3)
    questions = [f"how do I fix thing {i}?" for i in range(60)]
    answers = [short_or_long(rng, short=rng.random() < 0.5) for _ in questions]
    data = compile_feedback(
        realistic_feedback(get_persona("concise"), questions, answers, rate_share=1.0, seed=3)
    )
    first, reused = fit_or_load(
        model, tokenizer, base_model="tiny-random", data=data, path=path, min_auroc=0.65
    )
    assert not reused and isinstance(first, ThumbsJudge)
    saved = json.loads(path.read_text())
    assert saved["meta"]["format"] == 2
    _, reused = fit_or_load(
        model, tokenizer, base_model="tiny-random", data=data, path=path, min_auroc=0.65
    )
    assert reused
    saved["meta"]["format"] = 1  # a judge an older release fitted: refitted, not trusted blindly
    path.write_text(json.dumps(saved))
    _, reused = fit_or_load(
        model, tokenizer, base_model="tiny-random", data=data, path=path, min_auroc=0.65
    )
    assert not reused


def test_a_coin_flip_tenant_rarely_gets_a_judge(tiny: tuple[object, object]) -> None:
    # At n=30 held-out thumbs a coin's judge clears the bar now and then by chance (about one
    # time in forty by the interval's construction; seed 4 here does): the win rate and the
    # tenant metric stand behind it, and the workflow test shows a coin-flip tenant refused.
    model, tokenizer = tiny
    trusted = []
    for seed in range(3, 11):
        judge = train_thumbs_judge(
            model,
            tokenizer,
            base_model="tiny-random",
            train=_thumbs(60, seed=seed, noise=True),
            holdout=_thumbs(30, seed=seed + 100, noise=True),
        )
        assert isinstance(judge, ThumbsJudge)
        if judge.quality.trusted:
            trusted.append(seed)
        else:
            assert "cannot tell" in judge.quality.reason or "chance" in judge.quality.reason
    assert len(trusted) <= 1, trusted


def test_too_few_thumbs_is_said_not_guessed(tiny: tuple[object, object]) -> None:
    model, tokenizer = tiny
    few = train_thumbs_judge(
        model, tokenizer, base_model="tiny-random", train=_thumbs(6, seed=7), holdout=[]
    )
    assert isinstance(few, JudgeQuality) and not few.trusted
    assert "too few thumbs" in few.reason
    # Four held-out thumbs alone say nothing; with the train split's out-of-fold predictions
    # the judge is checked on all 44.
    enough = train_thumbs_judge(
        model,
        tokenizer,
        base_model="tiny-random",
        train=_thumbs(40, seed=8),
        holdout=_thumbs(4, seed=9),
    )
    assert isinstance(enough, ThumbsJudge)
    assert enough.quality.auroc is not None and enough.quality.auroc.n == 44
    assert enough.quality.n_holdout == 4 and "cross-validated" in enough.quality.reason


def test_long_fits_heartbeat_from_a_timer_in_the_callers_context() -> None:
    import contextvars
    import time

    from trainer.errors import TrainingCancelled
    from trainer.judge import _Heartbeats

    caller = contextvars.ContextVar("caller", default="none")
    caller.set("activity")
    seen: list[tuple[str, int, int]] = []
    with _Heartbeats(lambda done, total: seen.append((caller.get(), done, total)), 3, 9, 0.01):
        time.sleep(0.2)
    assert len(seen) >= 3 and set(seen) == {("activity", 3, 9)}
    count = len(seen)
    time.sleep(0.05)
    assert len(seen) == count  # the timer stopped with the block

    def cancel(done: int, total: int) -> None:
        raise TrainingCancelled("cancelled while fitting the tenant's judge", step=0)

    with pytest.raises(TrainingCancelled), _Heartbeats(cancel, 0, 1, 0.01):
        time.sleep(0.1)  # the fit finishes; the cancel is raised as the block ends
