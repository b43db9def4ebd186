"""The tenant's thumbs judge: a pointwise reward model P(up | conversation, answer), learned from
the tenant's own unpaired thumbs (as in Meta's RLUF, "Reinforcement Learning from User Feedback").

Real feedback is unpaired and scarce (one answer per question, a minority rated), so the judge is
small on purpose: a regularized logistic regression, its strength chosen by cross-validation on
the train split, on one of three descriptions of an answer, also chosen by cross-validation:

- the frozen base model's hidden states (:func:`trainer.generation.answer_features`), which carry
  what the answer says;
- twelve text statistics (:func:`answer_statistics`): how long it is, how long its sentences and
  words are, how it is laid out (lines, list items, bold and headings), whether it stops
  mid-sentence. Much of what users like or dislike is this (length and layout drive human
  preference ratings), and twelve numbers are learned from a hundred thumbs far more reliably
  than 1,700: on realistic traffic with SmolLM2, a probe on them told a "plain language"
  tenant's liked answers from the rest at AUROC 0.95 where the hidden states reached 0.79
  (mean of 5 seeds, ``tests/bench/judge_quality.py``);
- both.

A fine-tuned classifier head would overfit a hundred thumbs; the probe trains in seconds and
cannot drift with the adapter it judges, because its features come from the base model and the
text.

It may decide only when it has shown, on thumbs it never saw, that it tells liked from disliked
answers: out-of-fold predictions on the train split (nested cross-validation: each fold chooses
its own description and strength) and predictions on the held-out split, pooled; their AUROC must
reach the policy's bar and its interval must exclude chance. On sparse logs the held-out split
alone is a dozen thumbs, too few to tell a judge from a coin (a coin-flip tenant's judge scored
0.81 [0.57, 1.00] on 13 of them). The report carries that AUROC (with n and interval), the Brier
score and the description chosen either way.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.compiler import CompiledDataset, KTOExample
from trainer.generation import BASE, answer_features, use_adapter
from trainer.stats import Estimate, auroc
from trainer.text_measures import list_items, markup_marks, sentences, words

__all__ = [
    "FEATURE_SETS",
    "STATISTICS",
    "JudgeQuality",
    "ThumbsJudge",
    "answer_statistics",
    "fit_or_load",
    "train_thumbs_judge",
]

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 4
"""Fewer ups or downs than this (in a split) says nothing about a judge: it is not trained, or
not trusted."""
JUDGE_FILE = "judge.json"
JUDGE_FORMAT = 2
"""Bumped when what a judge file means changes: a run refits a judge saved in another format."""

HIDDEN, TEXT, BOTH = "hidden states", "text statistics", "hidden states + text statistics"
FEATURE_SETS = (TEXT, HIDDEN, BOTH)
"""The descriptions of an answer a judge may learn from (cross-validation picks one; a tie goes
to the earlier, smaller one)."""

STATISTICS = (
    "log words",
    "log sentences",
    "words per sentence",
    "letters per word",
    "lines",
    "list items",
    "bold and heading marks",
    "commas per word",
    "question marks",
    "exclamation marks",
    "digits per word",
    "ends a sentence",
)
"""What :func:`answer_statistics` returns, in order."""


def answer_statistics(answer: str) -> list[float]:
    """How an answer is written, not what it says (:data:`STATISTICS`): its length, its
    sentences and words, its layout, its punctuation, and whether it ends with sentence
    punctuation (an answer cut off mid-sentence does not)."""
    said = words(answer)
    n_sentences = len(sentences(answer))
    per_word = 1.0 / max(1, len(said))
    return [
        math.log1p(len(said)),
        math.log1p(n_sentences),
        len(said) / max(1, n_sentences),
        sum(len(w) for w in said) * per_word,
        float(sum(1 for line in answer.splitlines() if line.strip())),
        float(list_items(answer)),
        float(markup_marks(answer)),
        answer.count(",") * per_word,
        float(answer.count("?")),
        float(answer.count("!")),
        sum(ch.isdigit() for ch in answer) * per_word,
        float(answer.rstrip().endswith((".", "!", "?", ")", '"'))),
    ]


def _describe(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[Sequence[Mapping[str, str]], str]],
    features: str,
    *,
    batch_size: int,
    beat: Callable[[int, int], None] | None,
) -> list[list[float]]:
    """Each (conversation, answer) as the judge's ``features`` see it: hidden states (read on
    the base model, adapters off), text statistics, or both side by side. Text statistics need
    no model: a judge that chose them reads answers in microseconds."""
    rows: list[list[float]] = [[] for _ in items]
    if features in (HIDDEN, BOTH):
        with use_adapter(model, BASE):
            rows = answer_features(model, tokenizer, items, batch_size=batch_size, beat=beat)
    elif beat is not None:
        beat(len(items), len(items))
    if features in (TEXT, BOTH):
        rows = [
            row + answer_statistics(answer) for row, (_, answer) in zip(rows, items, strict=True)
        ]
    return rows


@dataclass
class JudgeQuality:
    """How well the judge separates the held-out thumbs; stored in the eval report."""

    trusted: bool
    reason: str
    auroc: Estimate | None = None
    brier: float | None = None
    """Mean squared error of P(up) on the held-out thumbs (0.25 is a coin's)."""
    n_train: int = 0
    n_holdout: int = 0
    regularization: float | None = None
    """The inverse L2 strength cross-validation picked."""
    features: str | None = None
    """The description of an answer cross-validation picked (one of :data:`FEATURE_SETS`)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["auroc"] = self.auroc.to_dict() if self.auroc else None
        return d


@dataclass
class ThumbsJudge:
    """A trained judge: ``P(up) = sigmoid(weights · features + bias)``, ``features`` one of
    :data:`FEATURE_SETS`."""

    weights: list[float]
    bias: float
    base_model: str
    quality: JudgeQuality = field(default_factory=lambda: JudgeQuality(False, "not evaluated"))
    features: str = HIDDEN

    def probabilities(
        self,
        model: Any,
        tokenizer: Any,
        items: Sequence[tuple[Sequence[Mapping[str, str]], str]],
        *,
        batch_size: int = 8,
        beat: Callable[[int, int], None] | None = None,
    ) -> list[float]:
        """P(up) for each (conversation, answer); hidden states are read on ``model`` with
        adapters off."""
        if not items:
            return []
        feats = _describe(model, tokenizer, items, self.features, batch_size=batch_size, beat=beat)
        out: list[float] = []
        for row in feats:
            z = self.bias + sum(w * x for w, x in zip(self.weights, row, strict=True))
            out.append(1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0))))
        return out

    def save(self, path: Path, *, meta: Mapping[str, Any] | None = None) -> None:
        """Plain JSON (no pickle): a judge file is data, never code. ``meta`` says what it was
        fitted on (a retry reuses the judge only for the same data). Written atomically."""
        payload = {
            "kind": "thumbs_judge",
            "base_model": self.base_model,
            "features": self.features,
            "weights": self.weights,
            "bias": self.bias,
            "quality": self.quality.to_dict(),
            "meta": dict(meta or {}),
        }
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(json.dumps(payload) + "\n")
        staging.replace(path)

    @classmethod
    def load(cls, path: Path) -> ThumbsJudge:
        raw = json.loads(path.read_text())
        if raw.get("kind") != "thumbs_judge":
            raise ValueError(f"{path} is not a thumbs judge")
        q = dict(raw.get("quality") or {})
        est = q.pop("auroc", None)
        quality = JudgeQuality(**q, auroc=Estimate(**est) if est else None)
        features = raw.get("features", HIDDEN)  # files from before the choice: hidden states
        if features not in FEATURE_SETS:
            raise ValueError(f"{path}: unknown judge features {features!r}")
        return cls(
            [float(w) for w in raw["weights"]],
            float(raw["bias"]),
            raw["base_model"],
            quality,
            features,
        )


def train_thumbs_judge(
    model: Any,
    tokenizer: Any,
    *,
    base_model: str,
    train: Sequence[KTOExample],
    holdout: Sequence[KTOExample],
    min_auroc: float = 0.65,
    seed: int = 0,
    batch_size: int = 8,
    beat: Callable[[int, int], None] | None = None,
    features: Sequence[str] = FEATURE_SETS,
) -> ThumbsJudge | JudgeQuality:
    """Fit the judge on ``train`` and measure it on ``holdout``; ``features`` are the
    descriptions cross-validation chooses from (all of :data:`FEATURE_SETS` unless a benchmark
    compares them).

    Returns the judge (its ``quality`` says whether it may decide), or only a
    :class:`JudgeQuality` with the reason when there is too little data to fit one.
    ``beat(done, total)`` reports the answers read so far (train split, then held-out split).
    """
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    unknown = set(features) - set(FEATURE_SETS)
    if unknown or not features:
        raise ValueError(f"features must be some of {FEATURE_SETS}, got {list(features)}")
    n_up = sum(ex.label for ex in train)
    n_down = len(train) - n_up
    total = len(train) + len(holdout)
    if min(n_up, n_down) < MIN_PER_CLASS:
        return JudgeQuality(
            False,
            f"too few thumbs to learn a judge from ({n_up} up, {n_down} down in the train split; "
            f"needs {MIN_PER_CLASS} of each)",
            n_train=len(train),
            n_holdout=len(holdout),
        )
    both = np.asarray(
        _describe(
            model,
            tokenizer,
            [(ex.prompt, ex.completion) for ex in train],
            TEXT if set(features) == {TEXT} else BOTH,
            batch_size=batch_size,
            beat=_counted(beat, 0, total),
        )
    )
    n_text = len(STATISTICS)
    described = {
        name: x
        for name, x in ((TEXT, both[:, -n_text:]), (HIDDEN, both[:, :-n_text]), (BOTH, both))
        if name in features
    }
    y = np.asarray([int(ex.label) for ex in train])
    splits = min(5, n_up, n_down)
    # A few hundred small fits take seconds, or minutes on a loaded CPU, with no batches to
    # count: the caller hears from a timer meanwhile (the fits always end: max_iter bounds them).
    fitting = _Heartbeats(beat, len(train), total)
    with fitting:
        features, pipe = _fit_probe(described, y, splits, seed)
        # Out-of-fold P(up) for every train thumb, each from a probe that never saw it and made
        # its own choice of description and strength on the other folds (so the choice cannot
        # flatter the judge): with the held-out split, the judge is checked on all the tenant's
        # thumbs instead of the held-out fifth alone, which is a dozen on sparse logs.
        out_of_fold = np.empty(len(y))
        outer = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed + 1)
        for fit_rows, test_rows in outer.split(both, y):
            chosen, fold_pipe = _fit_probe(
                {k: v[fit_rows] for k, v in described.items()},
                y[fit_rows],
                max(2, splits - 1),
                seed,
            )
            out_of_fold[test_rows] = fold_pipe.predict_proba(described[chosen][test_rows])[:, 1]
    scaler, fitted = pipe[0], pipe[-1]
    coef = fitted.coef_[0] / scaler.scale_
    bias = float(fitted.intercept_[0] - (coef * scaler.mean_).sum())
    judge = ThumbsJudge([float(c) for c in coef], bias, base_model, features=features)
    judge.quality = assess(
        judge,
        model,
        tokenizer,
        holdout,
        min_auroc=min_auroc,
        batch_size=batch_size,
        beat=_counted(beat, len(train), total),
        cross_validated=[(float(p), bool(lab)) for p, lab in zip(out_of_fold, y, strict=True)],
    )
    judge.quality.n_train = len(train)
    judge.quality.regularization = float(np.ravel(fitted.C_)[0])
    judge.quality.features = features
    logger.info("thumbs judge: %s", judge.quality.reason)
    return judge


def _fit_probe(described: Mapping[str, Any], y: Any, n_splits: int, seed: int) -> tuple[str, Any]:
    """The L2 logistic probe on each description in ``described`` (name → feature matrix), its
    strength chosen by ``n_splits``-fold cross-validated AUROC; returns the description whose
    best cross-validated AUROC is highest, and its probe fitted on all of ``y``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best: tuple[float, str, Any] | None = None
    for name in described:  # a tie goes to the first: twelve numbers before 1,700
        pipe = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(
                Cs=np.logspace(-4, 1, 11).tolist(),
                cv=StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed),
                scoring="roc_auc",
                class_weight="balanced",  # a tenant's users may be mostly happy or mostly not
                max_iter=5000,
                l1_ratios=(0.0,),  # plain L2
                use_legacy_attributes=False,
            ),
        ).fit(described[name], y)
        score = float(np.nanmax(pipe[-1].scores_.mean(axis=0)))
        if best is None or score > best[0]:
            best = (score, name, pipe)
    assert best is not None
    return best[1], best[2]


def assess(
    judge: ThumbsJudge,
    model: Any,
    tokenizer: Any,
    holdout: Sequence[KTOExample],
    *,
    min_auroc: float,
    batch_size: int = 8,
    cross_validated: Sequence[tuple[float, bool]] = (),
    beat: Callable[[int, int], None] | None = None,
) -> JudgeQuality:
    """AUROC and Brier score on thumbs the judge never saw — the held-out split, plus
    ``cross_validated`` (out-of-fold P(up), label) pairs from the train split — and whether they
    let the judge decide."""
    probs = judge.probabilities(
        model,
        tokenizer,
        [(ex.prompt, ex.completion) for ex in holdout],
        batch_size=batch_size,
        beat=beat,
    )
    scored = [*cross_validated, *((p, ex.label) for p, ex in zip(probs, holdout, strict=True))]
    ups = [p for p, label in scored if label]
    downs = [p for p, label in scored if not label]
    if min(len(ups), len(downs)) < MIN_PER_CLASS:
        return JudgeQuality(
            False,
            f"too little held-out data to check the judge ({len(ups)} up, {len(downs)} down; "
            f"needs {MIN_PER_CLASS} of each)",
            n_holdout=len(holdout),
        )
    area = auroc(ups, downs)
    brier = sum((p - float(label)) ** 2 for p, label in scored) / len(scored)
    trusted = area.value >= min_auroc and area.low > 0.5
    where = (
        f"thumbs it never saw (cross-validated train split and held-out split), "
        f"learned on {judge.features}"
    )
    if trusted:
        reason = f"judge AUROC {area} on {where} ≥ {min_auroc:.2f}: it may decide"
    elif area.value < min_auroc:
        reason = (
            f"judge AUROC {area} on {where} < {min_auroc:.2f}: it cannot tell liked from "
            "disliked answers well enough to decide"
        )
    else:
        reason = (
            f"judge AUROC {area} on {where}: its interval includes chance (0.5), too little "
            "data to trust it"
        )
    return JudgeQuality(trusted, reason, area, round(brier, 4), n_holdout=len(holdout))


def _counted(
    beat: Callable[[int, int], None] | None, before: int, total: int
) -> Callable[[int, int], None] | None:
    """``beat`` for one phase of reading answers, counted over all of them."""
    if beat is None:
        return None
    report = beat
    return lambda done, _: report(before + done, total)


class _Heartbeats:
    """Calls ``beat(done, total)`` every ``every_s`` seconds from a timer thread while the block
    runs. The thread runs in a copy of the caller's context, so a Temporal activity's heartbeat
    works from it."""

    def __init__(
        self, beat: Callable[[int, int], None] | None, done: int, total: int, every_s: float = 5.0
    ) -> None:
        self.beat, self.done, self.total, self.every_s = beat, done, total, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        assert self.beat is not None
        while not self._stop.wait(self.every_s):
            try:
                self.beat(self.done, self.total)
            except BaseException as exc:  # a cancel raised by the beat: re-raised in the caller
                self.error = exc
                return

    def __enter__(self) -> None:
        if self.beat is None:
            return
        self._stop.clear()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), daemon=True)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def fit_or_load(
    model: Any,
    tokenizer: Any,
    *,
    base_model: str,
    data: CompiledDataset,
    path: Path | None,
    min_auroc: float,
    seed: int = 0,
    batch_size: int = 8,
    beat: Callable[[int, int], None] | None = None,
) -> tuple[ThumbsJudge | JudgeQuality, bool]:
    """The run's judge for ``data``: loaded from ``path`` when it was fitted there on the same
    data with the same bar and seed (a GRPO run's training step, or an earlier attempt), else
    fitted (:func:`train_thumbs_judge`) and saved there. Returns it and whether it was loaded."""
    key = {
        "data_content_hash": data.card.content_hash,
        "min_auroc": min_auroc,
        "seed": seed,
        "format": JUDGE_FORMAT,
    }
    if path is not None and path.is_file():
        try:
            saved = ThumbsJudge.load(path)
            meta = json.loads(path.read_text()).get("meta", {})
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable judge %s: %s", path, exc)
        else:
            if meta == key and saved.base_model == base_model:
                logger.info("reusing the judge this run already fitted: %s", path)
                return saved, True
    learned = train_thumbs_judge(
        model,
        tokenizer,
        base_model=base_model,
        train=data.kto_train,
        holdout=data.kto_holdout,
        min_auroc=min_auroc,
        seed=seed,
        batch_size=batch_size,
        beat=beat,
    )
    if path is not None and isinstance(learned, ThumbsJudge):
        path.parent.mkdir(parents=True, exist_ok=True)
        learned.save(path, meta=key)
    return learned, False
