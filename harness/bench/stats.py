"""Statistics of the performance gate: summaries of timing samples, ratio intervals, the gate decision.

Pure functions on numbers, so the gate logic is tested on synthetic samples, never on wall-clock time.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from harness.records import FAIL, PASS

CONFIDENCE = 0.95  # two-sided; T_975 below holds the Student t quantiles for exactly this confidence
# 97.5% quantiles of Student's t by degrees of freedom (rounds - 1); beyond 30, 1.96 + 2.4/df is within 0.003.
T_975 = (math.nan, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    return T_975[df] if df < len(T_975) else 1.96 + 2.4 / df


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, p90 and minimum latency in milliseconds of per-call samples (in seconds)."""
    values = np.asarray(seconds, dtype=np.float64)
    median = float(np.median(values))
    return {"median_ms": median * 1e3, "p90_ms": float(np.percentile(values, 90)) * 1e3,
            "min_ms": float(values.min()) * 1e3, "samples": int(values.size)}


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of per-round ratios and its 95% Student-t interval, on the log scale.

    Logs make a 2x speed-up and a 2x slow-down weigh the same; the t quantile keeps the
    interval honest (wide) when there are only a handful of rounds.
    """
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    if logs.size == 0:
        return math.nan, math.nan, math.nan
    centre = float(np.exp(logs.mean()))
    if logs.size == 1:
        return centre, math.nan, math.nan
    half = t_quantile(logs.size - 1) * logs.std(ddof=1) / math.sqrt(logs.size)
    return centre, float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))


@dataclasses.dataclass
class GateDecision:
    """One candidate/baseline comparison of a metric where higher is better (tokens/s)."""

    metric: str
    ratio: float  # candidate / baseline: < 1 is a slow-down
    low: float
    high: float
    max_slowdown: float
    rounds: int
    status: str
    message: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def decide(metric: str, candidate: list[float], baseline: list[float], max_slowdown: float) -> GateDecision:
    """Fails only when the whole interval of candidate/baseline lies below 1 - max_slowdown.

    `candidate[i]` and `baseline[i]` were measured in the same round, back to back, so their
    ratio cancels the machine's drift; a noisy comparison gives a wide interval that straddles
    the limit and passes, a real slow-down gives an interval clear of it and fails.
    """
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError("candidate and baseline need the same, non-zero number of rounds")
    ratios = [c / b for c, b in zip(candidate, baseline)]
    ratio, low, high = ratio_interval(ratios)
    limit = 1.0 - max_slowdown
    failed = not math.isnan(high) and high < limit
    interval = f"[{low:.3f}, {high:.3f}]" if not math.isnan(low) else "(one round: no interval)"
    message = (f"{metric} candidate/baseline = {ratio:.3f}, {CONFIDENCE:.0%} interval {interval} over "
               f"{len(ratios)} rounds; fails when the interval lies below {limit:.3f}")
    return GateDecision(metric, ratio, low, high, max_slowdown, len(ratios), FAIL if failed else PASS, message)
