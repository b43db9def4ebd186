"""Candidate-vs-current evaluation: what the gate (:mod:`trainer.gate`) decides on.

Every measurement runs on one resident base model with the adapters switched per pass, and every
tenant number carries its n and 95 % interval (:mod:`trainer.stats`):

* **tenant metric** on the held-out split, from the model's own implicit reward
  ``log p(answer) - log p_base(answer)``: on preference pairs, how often the up-voted answer gets
  the higher reward (ties half, so the base model scores exactly 0.5); on unpaired thumbs (what
  real logs mostly hold), the AUROC of that reward between up- and down-voted answers;
* **win rate**: candidate and current answer the held-out questions fresh (greedy, the same
  decoding for both) and the tenant's thumbs judge (:mod:`trainer.judge`, trained here on the
  train split) scores both answers; the judge decides only if it separates the held-out thumbs;
* **capability**: a tenant-independent suite of instructions checked by code
  (:mod:`trainer.capability`), base vs candidate with the same decoding: damage users would feel
  even when the tenant's judge likes the answers (a "concise" adapter that stops answering);
* **drift**: mean per-token KL(base ‖ candidate) and the perplexity change on reference answers to
  a shared prompt set (the answers' text only: when to end the turn is a style the tenant may
  well have asked to change).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from trainer.compiler import CompiledDataset, KTOExample, PreferencePair, load_compiled
from trainer.generation import (
    BASE,
    answer_logprobs,
    generate_answers,
    load_with_adapters,
    token_kl_and_nll,
    use_adapter,
)
from trainer.judge import JUDGE_FILE, JudgeQuality, ThumbsJudge, fit_or_load
from trainer.stats import Estimate, auroc, paired_difference, proportion
from trainer.training import adapter_metrics, rewarded_by_tenant_judge

__all__ = [
    "EvalReport",
    "Judge",
    "evaluate",
    "regression_prompts",
]

logger = logging.getLogger(__name__)

Judge = Callable[[Sequence[Mapping[str, str]], str], float]
"""Scores an answer to a conversation: ``(messages, answer) -> float``, higher is better."""

CANDIDATE = "candidate"
CURRENT = "current"
_TIE = 1e-6
MIN_HOLDOUT_PAIRS = 8
"""Fewer held-out pairs than this and the pair metric is not read (the thumbs metric is)."""
MIN_HOLDOUT_PER_CLASS = 4
"""The thumbs metric needs this many held-out ups and downs."""
MIN_WIN_PROMPTS = 8
"""Fewer held-out questions than this and no win rate is computed."""


def regression_prompts() -> list[dict[str, Any]]:
    """The shared regression set: ``{"messages": [...], "reference": str}`` rows."""
    text = resources.files("trainer").joinpath("data/regression_prompts.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class EvalReport:
    """What the evaluate step found; stored with the adapter version (``to_dict`` is JSON-safe).

    Point values sit in flat fields; ``ci`` holds the same metrics as ``{value, low, high, n}``.
    """

    candidate: str
    current: str
    """``base`` when the tenant had no promoted adapter."""
    tenant_metric: str | None = None
    """Which held-out metric the gate reads: ``pairs`` or ``thumbs`` (None: too little data)."""
    tenant_metric_note: str = ""
    n_holdout_pairs: int = 0
    pref_accuracy_candidate: float | None = None
    pref_accuracy_current: float | None = None
    logprob_accuracy_candidate: float | None = None
    """Share of pairs where the candidate gives the up-voted answer a higher mean token log-prob."""
    logprob_accuracy_current: float | None = None
    n_holdout_thumbs: int = 0
    thumbs_auroc_candidate: float | None = None
    """AUROC of the candidate's implicit reward between held-out up- and down-voted answers."""
    thumbs_auroc_current: float | None = None
    pref_improvement: float | None = None
    """Candidate minus current on the tenant metric (point estimates)."""
    pref_improvement_low: float | None = None
    """The candidate's lower 95 % bound minus the current version's point estimate: what the
    gate compares with ``min_pref_improvement``."""
    judge: dict[str, Any] | None = None
    """The thumbs judge's quality (``JudgeQuality``): held-out AUROC, Brier score, trusted."""
    judge_trusted: bool = False
    judge_was_reward: bool = False
    """The candidate was trained to please this very judge (GRPO rewarded by it): its win rate
    measures how well the candidate learned the judge, not the tenant, so it is not independent
    evidence and the gate asks the held-out thumbs to show the lift on their own."""
    win_rate: float | None = None
    """Candidate wins / judged prompts (ties count half); ``None`` without a usable judge."""
    n_win_prompts: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    capability_base: float | None = None
    """Pass rate of the base model on the capability suite."""
    capability_candidate: float | None = None
    capability_drop: float | None = None
    """Base minus candidate pass rate (0.05 = five points worse)."""
    n_capability: int = 0
    capability_failures: list[dict[str, Any]] = field(default_factory=list)
    """Tasks the base passed and the candidate failed, with the candidate's answer."""
    regression_kl: float | None = None
    """Mean per-token KL(base ‖ candidate) on the shared regression set, in nats."""
    regression_ppl_base: float | None = None
    regression_ppl_candidate: float | None = None
    regression_ppl_increase: float | None = None
    """Relative perplexity change of the candidate vs base (0.1 = 10 % worse)."""
    n_regression_prompts: int = 0
    ci: dict[str, dict[str, Any]] = field(default_factory=dict)
    """95 % intervals by metric name: ``{"value", "low", "high", "n"}``."""
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few held-out questions with both answers and their judge scores, for people to read."""

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {k: clean(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def interval(self, name: str) -> Estimate | None:
        raw = self.ci.get(name)
        return Estimate(**raw) if raw else None

    def _put(self, name: str, est: Estimate) -> None:
        self.ci[name] = est.to_dict()


def _logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[Sequence[Mapping[str, str]], str]],
    names: Sequence[str],
    batch_size: int,
) -> dict[str, list[tuple[float, int]]]:
    """``(sum log p, tokens)`` of every answer under the base model and each adapter in
    ``names``: one forward pass per model, shared by every metric read from them."""
    out: dict[str, list[tuple[float, int]]] = {}
    for name in (BASE, *names):
        if name not in out:
            with use_adapter(model, name):
                out[name] = answer_logprobs(model, tokenizer, items, batch_size=batch_size)
    return out


def _implicit(scored: dict[str, list[tuple[float, int]]], name: str) -> list[float]:
    """``log p_adapter(answer) - log p_base(answer)`` per item."""
    return [lp - b for (lp, _), (b, _) in zip(scored[name], scored[BASE], strict=True)]


def _pair_metrics(
    report: EvalReport,
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    current: str,
    batch_size: int,
) -> tuple[Estimate, Estimate]:
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    scored = _logprobs(model, tokenizer, items, [CANDIDATE, current], batch_size)
    n = len(pairs)
    result: list[Estimate] = []
    for name, attr in ((CANDIDATE, "candidate"), (current, "current")):
        r = _implicit(scored, name)
        margins = [r[i] - r[n + i] for i in range(n)]
        right = sum(0.5 if abs(m) <= _TIE else float(m > 0) for m in margins)
        result.append(proportion(right, n))
        # Length-normalized view (mean token log-prob), for people reading the report.
        lp = scored[name]
        acc = sum(
            float(lp[i][0] / max(lp[i][1], 1) > lp[n + i][0] / max(lp[n + i][1], 1))
            for i in range(n)
        )
        setattr(report, f"logprob_accuracy_{attr}", acc / n)
    return result[0], result[1]


def _thumbs_metrics(
    model: Any,
    tokenizer: Any,
    thumbs: Sequence[KTOExample],
    current: str,
    batch_size: int,
) -> tuple[Estimate, Estimate]:
    items = [(ex.prompt, ex.completion) for ex in thumbs]
    scored = _logprobs(model, tokenizer, items, [CANDIDATE, current], batch_size)
    out: list[Estimate] = []
    for name in (CANDIDATE, current):
        rewards = _implicit(scored, name)
        ups = [r for r, ex in zip(rewards, thumbs, strict=True) if ex.label]
        downs = [r for r, ex in zip(rewards, thumbs, strict=True) if not ex.label]
        out.append(auroc(ups, downs))
    return out[0], out[1]


def _tenant_metric(
    report: EvalReport, model: Any, tokenizer: Any, compiled: CompiledDataset, current: str, bs: int
) -> None:
    pairs, thumbs = compiled.pairs_holdout, compiled.kto_holdout
    report.n_holdout_pairs, report.n_holdout_thumbs = len(pairs), len(thumbs)
    n_up = sum(ex.label for ex in thumbs)
    if len(pairs) >= MIN_HOLDOUT_PAIRS:
        cand, cur = _pair_metrics(report, model, tokenizer, pairs, current, bs)
        report.pref_accuracy_candidate, report.pref_accuracy_current = cand.value, cur.value
        report._put("pref_accuracy_candidate", cand)
        report._put("pref_accuracy_current", cur)
        report.tenant_metric = "pairs"
        report.tenant_metric_note = f"held-out preference accuracy on {len(pairs)} pairs"
    elif min(n_up, len(thumbs) - n_up) >= MIN_HOLDOUT_PER_CLASS:
        cand, cur = _thumbs_metrics(model, tokenizer, thumbs, current, bs)
        report.tenant_metric = "thumbs"
        report.tenant_metric_note = (
            f"implicit-reward AUROC on {len(thumbs)} held-out thumbs ({n_up} up)"
        )
    else:
        report.tenant_metric_note = (
            f"too little held-out data: {len(pairs)} pairs (needs {MIN_HOLDOUT_PAIRS}) and "
            f"{n_up} up / {len(thumbs) - n_up} down thumbs (needs {MIN_HOLDOUT_PER_CLASS} of each)"
        )
        return
    if report.tenant_metric == "thumbs":
        report.thumbs_auroc_candidate, report.thumbs_auroc_current = cand.value, cur.value
        report._put("thumbs_auroc_candidate", cand)
        report._put("thumbs_auroc_current", cur)
    report.pref_improvement = cand.value - cur.value
    report.pref_improvement_low = cand.low - cur.value


def _win_rate(
    report: EvalReport,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    current: str,
    score: Callable[[list[tuple[Sequence[Mapping[str, str]], str]]], list[float]],
    *,
    max_new_tokens: int,
    batch_size: int,
    beat: Callable[[int, int], None] | None = None,
) -> None:
    answers = {
        name: generate_answers(
            model,
            tokenizer,
            prompts,
            adapter=name,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_batch=beat,
        )
        for name in (CANDIDATE, current)
    }
    cand = [a for (a,) in answers[CANDIDATE]]
    cur = [a for (a,) in answers[current]]
    scores = score(
        [(p, a) for p, a in zip(prompts, cand, strict=True)]
        + [(p, a) for p, a in zip(prompts, cur, strict=True)]
    )
    # An answer with no text never wins: a learned judge has seen few or none, and may score
    # one as it scores the short answers a tenant likes.
    scores = [sc if ans.strip() else 0.0 for sc, ans in zip(scores, cand + cur, strict=True)]
    n = len(prompts)
    for i, prompt in enumerate(prompts):
        sa, sb = scores[i], scores[n + i]
        if abs(sa - sb) <= _TIE:
            report.ties += 1
        elif sa > sb:
            report.wins += 1
        else:
            report.losses += 1
        if len(report.samples) < 5:
            report.samples.append(
                {
                    "prompt": list(prompt),
                    "candidate": cand[i],
                    "current": cur[i],
                    "candidate_score": round(sa, 4),
                    "current_score": round(sb, 4),
                }
            )
    report.n_win_prompts = n
    est = proportion(report.wins + 0.5 * report.ties, n)
    report.win_rate = est.value
    report._put("win_rate", est)


def _capability(
    report: EvalReport,
    model: Any,
    tokenizer: Any,
    *,
    base_model: str,
    cache_dir: Path | None,
    max_tasks: int | None,
    max_new_tokens: int,
    batch_size: int,
    beat: Callable[[int, int], None] | None = None,
) -> None:
    from trainer.capability import CapabilityResult, load_capability_suite, run_capability_suite

    tasks = load_capability_suite()
    if max_tasks is not None:
        tasks = tasks[:max_tasks]

    def run(name: str) -> CapabilityResult:
        return run_capability_suite(
            model,
            tokenizer,
            adapter=name,
            tasks=tasks,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            on_batch=beat,
        )

    # The base model's answers do not depend on the tenant: cache them per base, suite and
    # decoding, which halves the guard's cost after the first run on a worker.
    base: dict[str, bool] | None = None
    cache: Path | None = None
    if cache_dir is not None:
        key = hashlib.sha256(
            json.dumps(
                [
                    base_model,
                    [t.id for t in tasks],
                    [t.instruction for t in tasks],
                    max_new_tokens,
                    batch_size,
                ]
            ).encode()
        ).hexdigest()[:16]
        cache = cache_dir / f"capability-base-{key}.json"
        if cache.is_file():
            base = {str(k): bool(v) for k, v in json.loads(cache.read_text()).items()}
    if base is None:
        base = run(BASE).results
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(base) + "\n")
    cand = run(CANDIDATE)
    ids = [t.id for t in tasks]
    b = [float(base[i]) for i in ids]
    c = [float(cand.results[i]) for i in ids]
    drop = paired_difference(b, c)
    report.n_capability = len(ids)
    report.capability_base = sum(b) / len(b)
    report.capability_candidate = sum(c) / len(c)
    report.capability_drop = drop.value
    report._put("capability_drop", drop)
    report._put("capability_base", proportion(sum(b), len(b)))
    report._put("capability_candidate", proportion(sum(c), len(c)))
    lost = {i for i in ids if base[i] and not cand.results[i]}
    report.capability_failures = [ex for ex in cand.examples if ex.get("id") in lost][:5]


def evaluate(
    *,
    base_model: str,
    candidate: Path,
    data: CompiledDataset | Path,
    data_dir: Path,
    current: Path | None = None,
    judge: Judge | None = None,
    min_judge_auroc: float = 0.65,
    judge_out: Path | None = None,
    max_win_prompts: int = 64,
    max_new_tokens: int = 96,
    win_rate: bool = True,
    capability: bool = True,
    max_capability_tasks: int | None = None,
    capability_max_new_tokens: int = 64,
    regression_set: Sequence[Mapping[str, Any]] | None = None,
    max_regression_prompts: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    candidate_label: str | None = None,
    current_label: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Compare adapter ``candidate`` with ``current`` (``None``: the base model).

    ``data`` supplies the train split (the thumbs judge learns from it) and the held-out split
    (everything is measured on it). ``judge`` replaces the learned judge with a given one (a
    configured judge, or a simulated user in benchmarks); it is trusted as given. The learned
    judge is read from ``judge_out`` when the run's training fitted it there on the same data,
    and written there otherwise. ``win_rate=False`` and
    ``capability=False`` skip those measurements (minutes of generation each on a CPU) when no
    check reads them. ``progress`` is called with the name of each phase as it starts, and with
    ``"<phase> done/total"`` after each batch of generation (the activity heartbeats with it).
    Adapters are verified first (:class:`CorruptAdapter`).
    """
    started = time.monotonic()
    compiled = data if isinstance(data, CompiledDataset) else load_compiled(data)
    adapters = {CANDIDATE: candidate}
    if current is not None:
        adapters[CURRENT] = current
    model, tokenizer = load_with_adapters(base_model, adapters, data_dir=data_dir, device=device)
    current_name = CURRENT if current is not None else BASE
    report = EvalReport(
        candidate=candidate_label or str(candidate),
        current=current_label or (str(current) if current is not None else BASE),
    )

    def beat(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        report_to = progress
        return lambda done, total: report_to(f"{name} {done}/{total}")

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        if progress is not None:
            progress(name)
        fn()
        report.timings[name] = round(time.monotonic() - t0, 2)

    timed(
        "tenant_metric",
        lambda: _tenant_metric(report, model, tokenizer, compiled, current_name, batch_size),
    )

    # Held-out rated questions first, then questions nobody rated: neither was trained on.
    prompts = [*compiled.grpo_holdout, *compiled.eval_prompts][:max_win_prompts]
    score: Callable[[list[tuple[Sequence[Mapping[str, str]], str]]], list[float]] | None = None
    if judge is not None:
        given = judge
        report.judge = {"trusted": True, "reason": "a judge given to the evaluation"}
        score = lambda items: [float(given(m, a)) for m, a in items]  # noqa: E731
    else:

        def learn() -> None:
            nonlocal score
            learned, _ = fit_or_load(
                model,
                tokenizer,
                base_model=base_model,
                data=compiled,
                path=judge_out / JUDGE_FILE if judge_out is not None else None,
                min_auroc=min_judge_auroc,
                seed=seed,
                batch_size=batch_size,
            )
            quality = learned if isinstance(learned, JudgeQuality) else learned.quality
            report.judge = quality.to_dict()
            if quality.auroc is not None:
                report._put("judge_auroc", quality.auroc)
            if isinstance(learned, ThumbsJudge) and quality.trusted:
                fitted = learned
                score = lambda items: fitted.probabilities(  # noqa: E731
                    model, tokenizer, items, batch_size=batch_size
                )

        timed("judge", learn)
    report.judge_trusted = score is not None
    report.judge_was_reward = judge is None and rewarded_by_tenant_judge(
        adapter_metrics(candidate) or {}
    )
    if win_rate and score is not None and len(prompts) >= MIN_WIN_PROMPTS:
        scorer = score
        timed(
            "win_rate",
            lambda: _win_rate(
                report,
                model,
                tokenizer,
                prompts,
                current_name,
                scorer,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                beat=beat("win_rate"),
            ),
        )

    if capability:
        timed(
            "capability",
            lambda: _capability(
                report,
                model,
                tokenizer,
                base_model=base_model,
                cache_dir=data_dir / "cache",
                max_tasks=max_capability_tasks,
                max_new_tokens=capability_max_new_tokens,
                batch_size=batch_size,
                beat=beat("capability"),
            ),
        )

    timed(
        "drift",
        lambda: _drift(
            report, model, tokenizer, regression_set, max_regression_prompts, batch_size
        ),
    )
    report.duration_s = round(time.monotonic() - started, 3)
    logger.info(
        "evaluated %s vs %s: tenant metric %s %s → %s, judge trusted %s, win rate %s, "
        "capability %s → %s, regression KL %s",
        report.candidate,
        report.current,
        report.tenant_metric,
        report.pref_accuracy_current or report.thumbs_auroc_current,
        report.pref_accuracy_candidate or report.thumbs_auroc_candidate,
        report.judge_trusted,
        report.win_rate,
        report.capability_base,
        report.capability_candidate,
        report.regression_kl,
    )
    return report


def _drift(
    report: EvalReport,
    model: Any,
    tokenizer: Any,
    regression_set: Sequence[Mapping[str, Any]] | None,
    max_regression_prompts: int | None,
    batch_size: int,
) -> None:
    rows = list(regression_set) if regression_set is not None else regression_prompts()
    if max_regression_prompts is not None:
        rows = rows[:max_regression_prompts]
    if rows:
        kl, nll_base, nll_cand = token_kl_and_nll(
            model,
            tokenizer,
            [(r["messages"], r["reference"]) for r in rows],
            adapter=CANDIDATE,
            batch_size=batch_size,
        )
        report.n_regression_prompts = len(rows)
        report.regression_kl = max(kl, 0.0)  # tiny negative values are float noise
        report.regression_ppl_base = math.exp(nll_base)
        report.regression_ppl_candidate = math.exp(nll_cand)
        report.regression_ppl_increase = math.exp(nll_cand - nll_base) - 1.0
