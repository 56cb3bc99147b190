"""Checks: pure functions from two stage outputs and their thresholds to a CheckResult."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness import stages
from harness.gates import judge
from harness.records import FAIL, PASS, CheckResult
from harness.workload import Trajectory, greedy_of


def verdict(model: str, stage: str, check: str, metrics: dict[str, Any], thresholds: dict[str, float],
            detail: str = "") -> CheckResult:
    """Holds metrics to thresholds; the message names every violation."""
    failures = judge(metrics, thresholds)
    message = "; ".join(failures + ([detail] if detail and failures else []))
    return CheckResult(model, stage, check, FAIL if failures else PASS, metrics, dict(thresholds), message)


def logit_errors(candidate: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    """Max/mean abs error, worst per-position cosine, top-1 agreement, and where the worst error is."""
    worst = (-1.0, 0, 0)
    abs_sum, count, cosines, agree = 0.0, 0, [], []
    for i, (c, r) in enumerate(zip(candidate, reference, strict=True)):
        c64, r64 = c.astype(np.float64), r.astype(np.float64)
        err = np.abs(c64 - r64)
        pos = int(err.max(-1).argmax())
        if err[pos].max() > worst[0] or np.isnan(err).any():
            worst = (float(np.nanmax(err)) if not np.isnan(err).any() else float("nan"), i, pos)
        abs_sum += float(err.sum())
        count += err.size
        norms = np.linalg.norm(c64, axis=-1) * np.linalg.norm(r64, axis=-1)
        cosines.append((c64 * r64).sum(-1) / np.maximum(norms, 1e-300))
        agree.append(c64.argmax(-1) == r64.argmax(-1))
    return {
        "max_abs_err": worst[0],
        "mean_abs_err": abs_sum / max(count, 1),
        "min_cosine": float(np.min(np.concatenate(cosines))),
        "top1": float(np.mean(np.concatenate(agree))),
        "worst_prompt": worst[1],
        "worst_position": worst[2],
        "reference_max_abs": float(max(np.abs(r).max() for r in reference)),
    }


def compare_logits(model: str, stage: str, candidate, reference, thresholds) -> CheckResult:
    metrics = logit_errors(candidate, reference)
    detail = (f"worst at prompt {metrics['worst_prompt']} position {metrics['worst_position']} "
              f"vs {stages.parent_stage(stage)}")
    return verdict(model, stage, stages.LOGITS, metrics, thresholds, detail)


def compare_greedy(model: str, stage: str, candidate: list[np.ndarray], trajectories: list[Trajectory],
                   thresholds) -> CheckResult:
    """Greedy generation along the HF trajectory: identical tokens, or where the first divergence is."""
    matched, total, first = 0, 0, None
    for i, (logits, traj) in enumerate(zip(candidate, trajectories, strict=True)):
        ours = greedy_of(logits, traj)
        same = ours == traj.greedy
        matched += int(same.sum())
        total += len(same)
        if first is None and not same.all():
            step = int(np.argmin(same))
            first = f"prompt {i} diverges at generated token {step}: {int(ours[step])} instead of HF's {int(traj.greedy[step])}"
    metrics = {"match": matched / max(total, 1), "tokens": total}
    return verdict(model, stage, stages.GREEDY, metrics, thresholds, first or "")


def kl_divergences(candidate: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    """KL(reference || candidate) of the softmax at every position, in float64."""
    out = []
    for c, r in zip(candidate, reference, strict=True):
        c64, r64 = c.astype(np.float64), r.astype(np.float64)
        log_p = r64 - r64.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        log_q = c64 - c64.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        out.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
    return np.concatenate(out)


def quant_accuracy(model: str, stage: str, candidate, float_reference, thresholds) -> CheckResult:
    """A quantized stage against the float flatbuffer: mean/p99/max KL and top-1 agreement."""
    kl = kl_divergences(candidate, float_reference)
    agree = np.concatenate([c.argmax(-1) == r.argmax(-1) for c, r in zip(candidate, float_reference)])
    metrics = {
        "mean_kl": float(kl.mean()),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "top1": float(agree.mean()),
        "positions": int(kl.size),
    }
    return verdict(model, stage, stages.QUANT_ACCURACY, metrics, thresholds, f"vs {stages.TFLITE_FLOAT}")


def sensitivity(model: str, entropy_ratio: float, thresholds) -> CheckResult:
    """Is the random reference sensitive: attention far enough from uniform to expose positional bugs?"""
    metrics = {"entropy_ratio": entropy_ratio}
    detail = "attention is near-uniform: raise the pair's init_std so positional defects show"
    return verdict(model, stages.HF, stages.SENSITIVITY, metrics, thresholds, detail)


def weight_coverage(model: str, coverage: dict[str, Any], thresholds) -> CheckResult:
    """Every checkpoint tensor consumed exactly once, every parameter loaded from the checkpoint."""
    metrics = {
        "checkpoint_tensors": coverage["checkpoint_tensors"],
        "unused_tensors": len(coverage["unused"]) + len(coverage["consumed_twice"]),
        "unloaded_params": len(coverage["unloaded_params"]),
    }
    lists = []
    for key, label in (("unused", "unused"), ("consumed_twice", "consumed twice"),
                       ("unloaded_params", "parameters not loaded from the checkpoint")):
        if coverage[key]:
            lists.append(f"{label}: {', '.join(coverage[key][:10])}" + (" ..." if len(coverage[key]) > 10 else ""))
    result = verdict(model, stages.REAUTHORED, stages.WEIGHT_COVERAGE, metrics, thresholds, "; ".join(lists))
    result.metrics["lists"] = {k: coverage[k] for k in ("unused", "consumed_twice", "unloaded_params")}
    return result
