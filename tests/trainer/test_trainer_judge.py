"""The tenant's thumbs judge: learns what a tenant's users like from unpaired thumbs, and is
allowed to decide only when it separates held-out thumbs it never saw."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import short_or_long
from trainer import KTOExample, ThumbsJudge, load_base_model, train_thumbs_judge
from trainer.judge import JudgeQuality


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
