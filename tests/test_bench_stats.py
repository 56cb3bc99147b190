"""The gate's statistics (harness.bench.stats), on synthetic samples, never on wall-clock time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.bench import stats
from harness.records import FAIL, PASS


def _noisy(rate: float, n: int, seed: int, noise: float = 0.03) -> list[float]:
    return list(rate * np.exp(np.random.default_rng(seed).normal(0, noise, n)))


def test_gate_flags_a_20_percent_slowdown():
    baseline = _noisy(1000.0, 8, seed=1)
    candidate = _noisy(800.0, 8, seed=2)
    decision = stats.decide("decode_tokens_per_s", candidate, baseline, max_slowdown=0.05)
    assert decision.status == FAIL
    assert decision.high < 0.95 and decision.low <= decision.ratio <= decision.high


def test_gate_passes_no_change_and_noise():
    baseline = _noisy(1000.0, 8, seed=3)
    for seed in range(20):
        decision = stats.decide("decode_tokens_per_s", _noisy(1000.0, 8, seed=100 + seed), baseline, 0.05)
        assert decision.status == PASS, decision.message


def test_gate_passes_a_slowdown_inside_the_budget():
    baseline = _noisy(1000.0, 8, seed=4, noise=0.01)
    decision = stats.decide("decode_tokens_per_s", _noisy(980.0, 8, seed=5, noise=0.01), baseline, 0.05)
    assert decision.status == PASS


def test_gate_needs_an_interval_clear_of_the_limit():
    """A 7% slow-down measured with wild noise straddles the 5% limit: no verdict of guilt."""
    baseline = _noisy(1000.0, 4, seed=6, noise=0.3)
    decision = stats.decide("decode_tokens_per_s", _noisy(930.0, 4, seed=7, noise=0.3), baseline, 0.05)
    assert decision.low < 0.95 < decision.high
    assert decision.status == PASS


def test_one_round_gives_no_interval_and_no_failure():
    decision = stats.decide("decode_tokens_per_s", [500.0], [1000.0], 0.05)
    assert math.isnan(decision.low) and decision.status == PASS


def test_decide_rejects_unpaired_samples():
    with pytest.raises(ValueError):
        stats.decide("decode_tokens_per_s", [1.0, 2.0], [1.0], 0.05)


def test_summarize():
    summary = stats.summarize([0.001, 0.002, 0.003, 0.010])
    assert summary["median_ms"] == pytest.approx(2.5) and summary["p90_ms"] > summary["median_ms"] >= summary["min_ms"]
    assert summary["samples"] == 4
