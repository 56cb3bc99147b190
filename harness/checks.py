"""Checks: pure functions from two stage outputs and their thresholds to a CheckResult."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness import stages
from harness.gates import Gate
from harness.records import PASS, CheckResult
from harness.workload import Trajectory, greedy_of


def judged(model: str, stage: str, check: str, metrics: dict[str, Any], gate: Gate, detail: str = "",
            detail_on_pass: bool = False) -> CheckResult:
    """Holds metrics to a gate; the message names every violation, and where, when it did not pass."""
    status, reasons = gate.judge(metrics)
    message = "; ".join(reasons + ([detail] if detail and (status != PASS or detail_on_pass) else []))
    defect = gate.defect.name if gate.defect else None
    return CheckResult(model, stage, check, status, metrics, dict(gate.thresholds), message, defect)


def logit_errors(candidate: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, Any]:
    """Max/mean abs error, worst per-position cosine, top-1 agreement, and where the worst error is.

    Over the real model's 262k vocabulary each prompt's logits are ~10^7 values a stage: every pass over them
    counts, so each is made once (a position's worst error serves the worst, NaN and the per-position curve).
    """
    worst = (-1.0, 0, 0)
    abs_sum, count, cosines, agree, per_position = 0.0, 0, [], [], []
    for i, (c, r) in enumerate(zip(candidate, reference, strict=True)):
        c64, r64 = c.astype(np.float64), r.astype(np.float64)
        err = np.abs(c64 - r64)
        row_worst = err.max(-1)  # NaN where a row has one (max propagates it)
        nan = bool(np.isnan(row_worst).any())
        pos = int(row_worst.argmax())
        if row_worst[pos] > worst[0] or nan:
            worst = (float("nan") if nan else float(row_worst[pos]), i, pos)
        abs_sum += float(err.sum())
        count += err.size
        del err
        norms = np.linalg.norm(c64, axis=-1) * np.linalg.norm(r64, axis=-1)
        cosines.append((c64 * r64).sum(-1) / np.maximum(norms, 1e-300))
        agree.append(c.argmax(-1) == r.argmax(-1))  # float32 to float64 is exact: the same argmax
        # The worst error at each position (3 significant digits): report.html draws where along the positions
        # a stage departs from its parent.
        per_position.append([float(f"{e:.3g}") for e in row_worst])
    return {
        "max_abs_err": worst[0],
        "mean_abs_err": abs_sum / max(count, 1),
        "min_cosine": float(np.min(np.concatenate(cosines))),
        "top1": float(np.mean(np.concatenate(agree))),
        "worst_prompt": worst[1],
        "worst_position": worst[2],
        "reference_max_abs": float(max(np.abs(r).max() for r in reference)),
        "per_position_max_abs_err": per_position,
    }


def compare_logits(model: str, stage: str, candidate, reference, gate: Gate, parent: str) -> CheckResult:
    """A stage's logits against those of the stage it was derived from (`parent`)."""
    metrics = logit_errors(candidate, reference)
    detail = f"worst at prompt {metrics['worst_prompt']} position {metrics['worst_position']} vs {parent}"
    return judged(model, stage, stages.LOGITS, metrics, gate, detail)


def greedy_match(candidate: list[np.ndarray], trajectories: list[Trajectory]) -> float:
    """The share of generated positions where a stage's argmax is HF's greedy token."""
    same = np.concatenate([greedy_of(logits, traj) == traj.greedy for logits, traj in zip(candidate, trajectories)])
    return float(same.mean()) if same.size else 1.0


def compare_greedy(model: str, stage: str, candidate: list[np.ndarray], trajectories: list[Trajectory],
                   gate: Gate) -> CheckResult:
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
    return judged(model, stage, stages.GREEDY, metrics, gate, first or "")


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


KL_PERCENTILES = (0, 10, 25, 50, 75, 90, 95, 99, 100)


def quant_accuracy(model: str, stage: str, candidate, float_reference, gate: Gate, trajectories=None) -> CheckResult:
    """A quantized stage against the float flatbuffer: mean/p99/max KL and top-1 agreement."""
    kl = kl_divergences(candidate, float_reference)
    agree = np.concatenate([c.argmax(-1) == r.argmax(-1) for c, r in zip(candidate, float_reference)])
    metrics = {
        "mean_kl": float(kl.mean()),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "top1": float(agree.mean()),
        "positions": int(kl.size),
        # The distribution over positions (percentile: KL), for report.html's curve; the gate reads the above.
        "kl_percentiles": {str(q): float(f"{v:.3g}") for q, v in zip(KL_PERCENTILES, np.percentile(kl, KL_PERCENTILES))},
    }
    if trajectories is not None:  # how often its greedy tokens are HF's, for the reader (not gated by default)
        metrics["greedy_match_vs_hf"] = greedy_match(candidate, trajectories)
    return judged(model, stage, stages.QUANT_ACCURACY, metrics, gate, f"vs {stages.TFLITE_FLOAT}")


def sensitivity(model: str, entropy_ratio: float, gate: Gate) -> CheckResult:
    """Is the random reference sensitive: attention far enough from uniform to expose positional bugs?"""
    metrics = {"entropy_ratio": entropy_ratio}
    detail = "attention is near-uniform: raise the pair's init_std so positional defects show"
    return judged(model, stages.HF, stages.SENSITIVITY, metrics, gate, detail)


def weight_coverage(model: str, coverage: dict[str, Any], gate: Gate) -> CheckResult:
    """Every checkpoint tensor consumed exactly once, every parameter loaded from the checkpoint."""
    metrics = {
        "checkpoint_tensors": coverage["checkpoint_tensors"],
        "unused_tensors": len(coverage["unused"]) + len(coverage["consumed_twice"]) + len(coverage.get("dropped", [])),
        "unloaded_params": len(coverage["unloaded_params"]),
    }
    lists = []
    for key, label in (("unused", "unused"), ("consumed_twice", "consumed twice"),
                       ("dropped", "mapped but dropped by load_state_dict (no module takes them)"),
                       ("unloaded_params", "parameters not loaded from the checkpoint")):
        if coverage.get(key):
            lists.append(f"{label}: {', '.join(coverage[key][:10])}" + (" ..." if len(coverage[key]) > 10 else ""))
    metrics["lists"] = {k: coverage.get(k, []) for k in ("unused", "consumed_twice", "dropped", "unloaded_params")}
    return judged(model, stages.REAUTHORED, stages.WEIGHT_COVERAGE, metrics, gate, "; ".join(lists))


def composite_body(model: str, bodies: np.ndarray, resolved: np.ndarray, composites: int, where: str,
                   gate: Gate) -> CheckResult:
    """StableHLO with every composite body as lowered vs resolved from the composite's attributes, as the
    converter does: a difference is a body that disagrees with the op the flatbuffer gets (an upstream defect)."""
    err = np.abs(bodies.astype(np.float64) - resolved.astype(np.float64))
    metrics = {"max_abs_err": float(err.max()), "composites_from_attributes": composites}
    detail = (f"{where}: the lowered bodies disagree with their composites' attributes ({composites} composites "
              "resolved from attributes over the signatures); XlaCallModule runs a body, the TFLite converter "
              "builds the op from the attributes")
    return judged(model, stages.STABLEHLO, stages.COMPOSITE_BODY, metrics, gate, detail)


# ---------------------------------------------------------------- the bundle (harness/bundle.py)

def tokenizer_parity(model: str, stage: str, texts: tuple[str, ...], hf_ids: list[list[int]], hf_texts: list[str],
                     engine_ids: list[list[int]], engine_texts: list[str], gate: Gate) -> CheckResult:
    """The engine's tokenize, and detokenize of what it tokenized, against the HF tokenizer's, text by text."""
    wrong = [i for i, (a, b, c, d) in enumerate(zip(hf_ids, engine_ids, hf_texts, engine_texts, strict=True))
             if a != b or c != d]
    detail = ""
    if wrong:
        i = wrong[0]
        detail = (f"text {i} {texts[i]!r}: the engine gives ids {engine_ids[i]} and text {engine_texts[i]!r}, "
                  f"HF ids {hf_ids[i]} and text {hf_texts[i]!r}")
    return judged(model, stage, stages.TOKENIZER, {"mismatches": len(wrong), "texts": len(texts)}, gate, detail)


def bundle_metadata(model: str, stage: str, expected: dict[str, Any], engine: dict[str, Any], gate: Gate) -> CheckResult:
    """The bundle's start and stop ids, as the engine reads them, against HF's (its Python API does not expose
    the context length the bundle declares)."""
    wrong = [f"{name}: the engine reads {engine.get(name)!r}, HF has {value!r}"
             for name, value in expected.items() if engine.get(name) != value]
    return judged(model, stage, stages.METADATA, {"mismatches": len(wrong), "fields": len(expected)}, gate,
                  "; ".join(wrong))


def bundle_greedy(model: str, stage: str, reference_texts: list[str], engine_texts: list[str], gate: Gate,
                  against: str = "HF") -> CheckResult:
    """The engine's greedy text against the reference's, prompt by prompt (the engine returns text, never ids)."""
    texts = [{"reference": a, stage: b} for a, b in zip(reference_texts, engine_texts, strict=True)]
    wrong = [i for i, t in enumerate(texts) if t["reference"] != t[stage]]
    detail = (f"prompt {wrong[0]}: the engine wrote {engine_texts[wrong[0]]!r}, {against} "
              f"{reference_texts[wrong[0]]!r}" if wrong else "")
    return judged(model, stage, stages.GREEDY_TEXT, {"identical": 1 - len(wrong) / max(len(texts), 1),
                                                     "texts": texts, "against": against}, gate, detail)


def bundle_score(model: str, stage: str, scored: tuple[tuple[str, str], ...], reference: list[dict[str, list[float]]],
                 engine: list[list[float]], gate: Gate, against: str = "HF") -> CheckResult:
    """The engine's text scores (per-token log-probabilities of a target after its context) against the
    reference's, after the context and after the context with its second-to-last token dropped."""
    def worst(key: str) -> float:
        return max((abs(sum(e) - sum(r[key])) for e, r in zip(engine, reference, strict=True)), default=float("nan"))

    counts = [i for i, (e, r) in enumerate(zip(engine, reference)) if len(e) != len(r["context"])]
    token_err = max((abs(a - b) for e, r in zip(engine, reference) if len(e) == len(r["context"])
                     for a, b in zip(e, r["context"])), default=float("nan"))
    metrics = {"score_err": worst("context"), "token_err": token_err,
               "dropped_token_context_err": worst("dropped_token_context"), "token_count_mismatches": len(counts),
               "targets": len(scored), "against": against,
               "scores": [{"engine": sum(e), "reference": sum(r["context"]),
                           "reference_dropped_token_context": sum(r["dropped_token_context"])}
                          for e, r in zip(engine, reference)]}
    i = max(range(len(engine)), key=lambda k: abs(sum(engine[k]) - sum(reference[k]["context"])), default=None)
    detail = "" if i is None else (
        f"target {i} {scored[i][1]!r} after {scored[i][0]!r}: the engine scores {sum(engine[i]):.4f} nats, "
        f"{against} {sum(reference[i]['context']):.4f} ({sum(reference[i]['dropped_token_context']):.4f} with the "
        f"context's second-to-last token dropped)")
    return judged(model, stage, stages.SCORE, metrics, gate, detail)


def prompt_template(model: str, stage: str, hf_ids: list[int], engine_ids: list[int], engine_text: str,
                    gate: Gate) -> CheckResult:
    """The ids the model sees for a short conversation: the engine's template rendering (its start token
    prepended, as it runs it) against HF's apply_chat_template."""
    first = next((i for i, (a, b) in enumerate(zip(hf_ids, engine_ids)) if a != b), None)
    if first is None and len(hf_ids) != len(engine_ids):
        first = min(len(hf_ids), len(engine_ids))
    detail = "" if first is None else (
        f"the ids differ from position {first} of {len(hf_ids)}: the engine renders {engine_text!r}")
    return judged(model, stage, stages.PROMPT_TEMPLATE, {"mismatches": int(first is not None), "hf_tokens": len(hf_ids),
                                                         "engine_tokens": len(engine_ids)}, gate, detail)
