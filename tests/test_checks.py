"""Every check passes on equal outputs and fails, with a precise message, on a real difference."""

import numpy as np
import pytest

from harness import checks, stages
from harness.gates import Gate
from harness.records import ERROR, FAIL, PASS
from harness.workload import Trajectory

FLOAT_LIMITS = {"max_max_abs_err": 1e-4, "min_min_cosine": 0.999999, "min_top1": 1.0}
FLOAT_GATES = Gate(FLOAT_LIMITS)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return [rng.normal(0, 3, (9, 32)).astype(np.float32), rng.normal(0, 3, (12, 32)).astype(np.float32)]


def test_compare_logits_passes_on_identical(logits):
    result = checks.compare_logits("m", stages.EXPORTED, logits, logits, FLOAT_GATES, stages.REAUTHORED)
    assert result.status == PASS
    assert result.metrics["max_abs_err"] == 0.0
    assert result.threshold == FLOAT_LIMITS


def test_compare_logits_fails_and_locates_the_worst_position(logits):
    moved = [x.copy() for x in logits]
    moved[1][7, 3] += 0.5
    result = checks.compare_logits("m", stages.EXPORTED, moved, logits, FLOAT_GATES, stages.REAUTHORED)
    assert result.status == FAIL
    assert result.metrics["max_abs_err"] == pytest.approx(0.5, rel=1e-5)
    assert "prompt 1 position 7" in result.message
    assert "max_abs_err=0.5 > 0.0001" in result.message
    # The per-position curve report.html draws: zero everywhere but where the error was planted.
    curve = result.metrics["per_position_max_abs_err"]
    assert [len(c) for c in curve] == [9, 12] and curve[0] == [0.0] * 9
    assert curve[1][7] == pytest.approx(0.5, rel=1e-3) and curve[1][:7] == [0.0] * 7 == curve[1][8:] + [0.0] * 3


def test_compare_logits_fails_on_nan(logits):
    moved = [x.copy() for x in logits]
    moved[0][2, 2] = np.nan
    assert checks.compare_logits("m", stages.EXPORTED, moved, logits, FLOAT_GATES, stages.REAUTHORED).status == FAIL


def test_compare_greedy_names_the_first_divergence(logits):
    trajectory = Trajectory(prompt_len=5, tokens=np.concatenate([np.ones(5, int), logits[0][4:].argmax(-1)]))
    ok = checks.compare_greedy("m", stages.TFLITE_FLOAT, [logits[0]], [trajectory], Gate({"min_match": 1.0}))
    assert ok.status == PASS and ok.metrics["match"] == 1.0
    moved = logits[0].copy()
    moved[6, (moved[6].argmax() + 1) % 32] += 100.0
    bad = checks.compare_greedy("m", stages.TFLITE_FLOAT, [moved], [trajectory], Gate({"min_match": 1.0}))
    assert bad.status == FAIL
    assert "prompt 0 diverges at generated token 2" in bad.message


def test_quant_accuracy_budget(logits):
    rng = np.random.default_rng(1)
    budget = Gate({"max_mean_kl": 0.02, "min_top1": 0.9})
    slight = [x + rng.normal(0, 0.01, x.shape).astype(np.float32) for x in logits]
    assert checks.quant_accuracy("m", "tflite_dynamic_int8", slight, logits, budget).status == PASS
    wrecked = [x + rng.normal(0, 3, x.shape).astype(np.float32) for x in logits]
    result = checks.quant_accuracy("m", "tflite_dynamic_int8", wrecked, logits, budget)
    assert result.status == FAIL
    assert result.metrics["mean_kl"] > 0.02 and "mean_kl=" in result.message
    assert {"mean_kl", "p99_kl", "max_kl", "top1"} <= set(result.metrics)


def test_kl_is_zero_on_identical_and_positive_otherwise(logits):
    assert np.allclose(checks.kl_divergences(logits, logits), 0.0, atol=1e-12)
    assert (checks.kl_divergences([x * 2 for x in logits], logits) > 0).all()


def test_sensitivity_fails_on_near_uniform_attention():
    assert checks.sensitivity("m", 0.4, Gate({"max_entropy_ratio": 0.85})).status == PASS
    bad = checks.sensitivity("m", 0.99, Gate({"max_entropy_ratio": 0.85}))
    assert bad.status == FAIL and "init_std" in bad.message


def test_weight_coverage_lists_unused_and_unloaded():
    gates = Gate({"max_unused_tensors": 0, "max_unloaded_params": 0})
    clean = {"checkpoint_tensors": 3, "unused": [], "consumed_twice": [], "dropped": [], "unloaded_params": []}
    assert checks.weight_coverage("m", clean, gates).status == PASS
    bad = dict(clean, unused=["model.layers.0.mlp.extra.weight"], unloaded_params=["lm_head.weight"])
    result = checks.weight_coverage("m", bad, gates)
    assert result.status == FAIL
    assert "model.layers.0.mlp.extra.weight" in result.message and "lm_head.weight" in result.message
    dropped = checks.weight_coverage("m", dict(clean, dropped=["transformer_blocks.0.atten_func.query_norm.weight"]),
                                     gates)
    assert dropped.status == FAIL and "dropped by load_state_dict" in dropped.message


def test_a_check_without_thresholds_is_an_error(logits):
    result = checks.compare_logits("m", stages.EXPORTED, logits, logits, Gate({}), stages.REAUTHORED)
    assert result.status == ERROR and "not judged is not a pass" in result.message
