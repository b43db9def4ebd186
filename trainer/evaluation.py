"""Candidate-vs-current evaluation and the promotion gate.

Three measurements, all with one resident base model and the adapters switched per pass:

* **tenant preference**: on held-out pairs, the implicit reward
  ``(log p(chosen) - log p_base(chosen)) - (log p(rejected) - log p_base(rejected))``;
  a model "prefers" the up-voted answer when it is positive (ties count half, so the base model
  scores exactly 0.5);
* **win rate**: greedy answers of candidate and current on held-out prompts, scored by a judge;
* **regression**: mean per-token KL(base ‖ candidate) and the perplexity change on reference
  answers to a shared, tenant-independent prompt set shipped with the package (the answers' text
  only: when to end the turn is a style the tenant may well have asked to change).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from trainer.compiler import CompiledDataset, PreferencePair, load_compiled
from trainer.errors import InvalidSpec
from trainer.generation import (
    BASE,
    answer_logprobs,
    generate_answers,
    load_with_adapters,
    token_kl_and_nll,
    use_adapter,
)

__all__ = [
    "EvalReport",
    "GateDecision",
    "GatePolicy",
    "Judge",
    "evaluate",
    "gate",
    "regression_prompts",
]

logger = logging.getLogger(__name__)

Judge = Callable[[Sequence[Mapping[str, str]], str], float]
"""Scores an answer to a conversation: ``(messages, answer) -> float``, higher is better."""

CANDIDATE = "candidate"
CURRENT = "current"
_TIE = 1e-6


def regression_prompts() -> list[dict[str, Any]]:
    """The shared regression set: ``{"messages": [...], "reference": str}`` rows."""
    text = resources.files("trainer").joinpath("data/regression_prompts.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class EvalReport:
    """What the evaluate step found; stored with the adapter version (``to_dict`` is JSON-safe)."""

    candidate: str
    current: str
    """``base`` when the tenant had no promoted adapter."""
    n_holdout_pairs: int = 0
    pref_accuracy_candidate: float | None = None
    pref_accuracy_current: float | None = None
    pref_improvement: float | None = None
    """Candidate minus current preference accuracy (the gate's tenant metric)."""
    logprob_accuracy_candidate: float | None = None
    """Share of pairs where the candidate gives the up-voted answer a higher mean token log-prob."""
    logprob_accuracy_current: float | None = None
    win_rate: float | None = None
    """Candidate wins / judged prompts (ties count half); ``None`` without a judge."""
    n_win_prompts: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    regression_kl: float | None = None
    """Mean per-token KL(base ‖ candidate) on the shared regression set, in nats."""
    regression_ppl_base: float | None = None
    regression_ppl_candidate: float | None = None
    regression_ppl_increase: float | None = None
    """Relative perplexity change of the candidate vs base (0.1 = 10 % worse)."""
    n_regression_prompts: int = 0
    duration_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    """A few held-out prompts with both answers and their judge scores, for people to read."""

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {k: clean(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GatePolicy:
    """Promotion thresholds; a threshold set to ``None`` is not checked."""

    min_pref_improvement: float | None = 0.05
    """Held-out preference accuracy must beat the current version's by at least this."""
    min_win_rate: float | None = None
    """Judge win rate vs current must reach this (needs a judge at evaluation time)."""
    max_regression_kl: float | None = 0.5
    """Mean per-token KL from the base model on the shared set must stay at or under this."""
    max_ppl_increase: float | None = 0.25
    """Relative perplexity increase on the shared set must stay at or under this."""

    def __post_init__(self) -> None:
        if self.min_win_rate is not None and not 0.0 <= self.min_win_rate <= 1.0:
            raise InvalidSpec(f"min_win_rate must be in [0, 1], got {self.min_win_rate}")
        for name in ("max_regression_kl", "max_ppl_increase"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidSpec(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    checks: dict[str, bool] = field(default_factory=dict)


def gate(report: EvalReport, policy: GatePolicy) -> GateDecision:
    """Promote only if every configured check passes; the reason lists each check's numbers."""
    checks: dict[str, bool] = {}
    notes: list[str] = []

    if policy.min_pref_improvement is not None:
        if report.pref_improvement is None:
            checks["preference"] = False
            notes.append("no held-out preference pairs to measure the tenant metric on")
        else:
            ok = report.pref_improvement >= policy.min_pref_improvement
            checks["preference"] = ok
            notes.append(
                f"held-out preference accuracy {report.pref_accuracy_candidate:.3f} vs "
                f"{report.pref_accuracy_current:.3f} ({report.pref_improvement:+.3f}, "
                f"{'≥' if ok else '<'} {policy.min_pref_improvement:+.3f} required)"
            )
    if policy.min_win_rate is not None:
        if report.win_rate is None:
            checks["win_rate"] = False
            notes.append("no win rate (evaluated without a judge)")
        else:
            ok = report.win_rate >= policy.min_win_rate
            checks["win_rate"] = ok
            notes.append(
                f"win rate {report.win_rate:.3f} {'≥' if ok else '<'} {policy.min_win_rate:.3f}"
            )
    if policy.max_regression_kl is not None:
        if report.regression_kl is None:
            checks["regression_kl"] = False
            notes.append("regression KL was not measured")
        else:
            ok = report.regression_kl <= policy.max_regression_kl
            checks["regression_kl"] = ok
            notes.append(
                f"regression KL {report.regression_kl:.4f} "
                f"{'≤' if ok else '>'} {policy.max_regression_kl:.4f}"
            )
    if policy.max_ppl_increase is not None:
        if report.regression_ppl_increase is None:
            checks["regression_ppl"] = False
            notes.append("regression perplexity was not measured")
        else:
            ok = report.regression_ppl_increase <= policy.max_ppl_increase
            checks["regression_ppl"] = ok
            notes.append(
                f"perplexity change {report.regression_ppl_increase:+.3f} "
                f"{'≤' if ok else '>'} {policy.max_ppl_increase:+.3f}"
            )
    promote = all(checks.values())
    failed = [name for name, ok in checks.items() if not ok]
    head = "promote" if promote else f"reject ({', '.join(failed)} failed)"
    return GateDecision(promote, f"{head}: " + ("; ".join(notes) or "no checks configured"), checks)


def _pref_accuracy(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    name: str,
    base_lp: list[float],
    batch_size: int,
) -> tuple[float, float]:
    """(implicit-reward accuracy, mean-token-logprob accuracy) of adapter ``name``."""
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    with use_adapter(model, name):
        scored = answer_logprobs(model, tokenizer, items, batch_size=batch_size)
    n = len(pairs)
    implicit = mean_lp = 0.0
    for i in range(n):
        (lc, nc), (lr, nr) = scored[i], scored[n + i]
        margin = (lc - base_lp[i]) - (lr - base_lp[n + i])
        implicit += 0.5 if abs(margin) <= _TIE else float(margin > 0)
        mean_lp += float(lc / max(nc, 1) > lr / max(nr, 1))
    return implicit / n, mean_lp / n


def evaluate(
    *,
    base_model: str,
    candidate: Path,
    data: CompiledDataset | Path,
    data_dir: Path,
    current: Path | None = None,
    judge: Judge | None = None,
    max_win_prompts: int = 16,
    max_new_tokens: int = 64,
    regression_set: Sequence[Mapping[str, Any]] | None = None,
    max_regression_prompts: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    candidate_label: str | None = None,
    current_label: str | None = None,
) -> EvalReport:
    """Compare adapter ``candidate`` with ``current`` (``None``: the base model).

    ``data`` supplies the held-out pairs and prompts (its train split is not used).
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

    pairs = compiled.pairs_holdout
    report.n_holdout_pairs = len(pairs)
    if pairs:
        items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        with use_adapter(model, BASE):
            base_lp = [
                lp for lp, _ in answer_logprobs(model, tokenizer, items, batch_size=batch_size)
            ]
        cand_acc, cand_lp = _pref_accuracy(model, tokenizer, pairs, CANDIDATE, base_lp, batch_size)
        cur_acc, cur_lp = _pref_accuracy(model, tokenizer, pairs, current_name, base_lp, batch_size)
        report.pref_accuracy_candidate = cand_acc
        report.pref_accuracy_current = cur_acc
        report.pref_improvement = cand_acc - cur_acc
        report.logprob_accuracy_candidate = cand_lp
        report.logprob_accuracy_current = cur_lp

    prompts = list(compiled.grpo_holdout)[:max_win_prompts]
    if judge is not None and prompts:
        cand_answers = generate_answers(
            model,
            tokenizer,
            prompts,
            adapter=CANDIDATE,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        cur_answers = generate_answers(
            model,
            tokenizer,
            prompts,
            adapter=current_name,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        for prompt, (a,), (b,) in zip(prompts, cand_answers, cur_answers, strict=True):
            sa, sb = float(judge(prompt, a)), float(judge(prompt, b))
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
                        "candidate": a,
                        "current": b,
                        "candidate_score": sa,
                        "current_score": sb,
                    }
                )
        report.n_win_prompts = len(prompts)
        report.win_rate = (report.wins + 0.5 * report.ties) / len(prompts)

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

    report.duration_s = round(time.monotonic() - started, 3)
    logger.info(
        "evaluated %s vs %s: preference %s → %s, win rate %s, regression KL %s",
        report.candidate,
        report.current,
        report.pref_accuracy_current,
        report.pref_accuracy_candidate,
        report.win_rate,
        report.regression_kl,
    )
    return report
