"""The tenant's thumbs judge: a pointwise reward model P(up | conversation, answer), learned from
the tenant's own unpaired thumbs (as in Meta's RLUF, "Reinforcement Learning from User Feedback").

Real feedback is unpaired and scarce (one answer per question, a minority rated), so the judge is
small on purpose: a regularized logistic regression on the frozen base model's hidden states
(:func:`trainer.generation.answer_features`), its strength chosen by cross-validation on the
train split. A fine-tuned classifier head would overfit a hundred thumbs; the probe trains in
seconds and cannot drift with the adapter it judges, because its features come from the base.

It may decide only when it has shown, on thumbs it never saw, that it tells liked from disliked
answers: out-of-fold predictions on the train split (nested cross-validation) and predictions on
the held-out split, pooled; their AUROC must reach the policy's bar and its interval must exclude
chance. On sparse logs the held-out split alone is a dozen thumbs, too few to tell a judge from
a coin (a coin-flip tenant's judge scored 0.81 [0.57, 1.00] on 13 of them). The report
carries that AUROC (with n and interval) and the Brier score either way.
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

__all__ = ["JudgeQuality", "ThumbsJudge", "fit_or_load", "train_thumbs_judge"]

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 4
"""Fewer ups or downs than this (in a split) says nothing about a judge: it is not trained, or
not trusted."""
JUDGE_FILE = "judge.json"


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["auroc"] = self.auroc.to_dict() if self.auroc else None
        return d


@dataclass
class ThumbsJudge:
    """A trained judge: ``P(up) = sigmoid(weights · features + bias)``."""

    weights: list[float]
    bias: float
    base_model: str
    quality: JudgeQuality = field(default_factory=lambda: JudgeQuality(False, "not evaluated"))

    def probabilities(
        self,
        model: Any,
        tokenizer: Any,
        items: Sequence[tuple[Sequence[Mapping[str, str]], str]],
        *,
        batch_size: int = 8,
        beat: Callable[[int, int], None] | None = None,
    ) -> list[float]:
        """P(up) for each (conversation, answer), scored on ``model`` with adapters off."""
        if not items:
            return []
        with use_adapter(model, BASE):
            feats = answer_features(model, tokenizer, items, batch_size=batch_size, beat=beat)
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
        return cls(
            [float(w) for w in raw["weights"]], float(raw["bias"]), raw["base_model"], quality
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
) -> ThumbsJudge | JudgeQuality:
    """Fit the judge on ``train`` and measure it on ``holdout``.

    Returns the judge (its ``quality`` says whether it may decide), or only a
    :class:`JudgeQuality` with the reason when there is too little data to fit one.
    ``beat(done, total)`` reports the answers read so far (train split, then held-out split).
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
    with use_adapter(model, BASE):
        x = np.asarray(
            answer_features(
                model,
                tokenizer,
                [(ex.prompt, ex.completion) for ex in train],
                batch_size=batch_size,
                beat=_counted(beat, 0, total),
            )
        )
    y = np.asarray([int(ex.label) for ex in train])

    def probe(n_splits: int) -> Any:
        return make_pipeline(
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
        )

    splits = min(5, n_up, n_down)
    pipe = probe(splits)
    # A few hundred small fits take seconds, or minutes on a loaded CPU, with no batches to
    # count: the caller hears from a timer meanwhile (the fits always end: max_iter bounds them).
    fitting = _Heartbeats(beat, len(train), total)
    with fitting:
        pipe.fit(x, y)
    # Out-of-fold P(up) for every train thumb, each from a probe (with its own inner choice of
    # strength) that never saw it: with the held-out split, the judge is checked on all the
    # tenant's thumbs instead of the held-out fifth alone, which is a dozen on sparse logs.
    with fitting:
        out_of_fold = cross_val_predict(
            probe(max(2, splits - 1)),
            x,
            y,
            cv=StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed + 1),
            method="predict_proba",
        )[:, 1]
    scaler, fitted = pipe[0], pipe[-1]
    coef = fitted.coef_[0] / scaler.scale_
    bias = float(fitted.intercept_[0] - (coef * scaler.mean_).sum())
    judge = ThumbsJudge([float(c) for c in coef], bias, base_model)
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
    logger.info("thumbs judge: %s", judge.quality.reason)
    return judge


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
    where = "thumbs it never saw (cross-validated train split and held-out split)"
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
    key = {"data_content_hash": data.card.content_hash, "min_auroc": min_auroc, "seed": seed}
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
