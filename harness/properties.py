"""`harness verify`'s properties: a fixed, seeded set of cases per stage, held to the gates.

The properties themselves are the functions of harness.property_measures; here they run over
`CASES_PER_STAGE` seeded cases at every property stage, beside the HF model's references, and
become prefill_decode and kv_cache records with the command that reproduces a failure.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from harness import stages
from harness.checkpoint import load_hf
from harness.checks import judged
from harness.errors import HarnessError
from harness.gates import judge
from harness.property_measures import (Deviation, causality, chunked_prefill, decode_write, determinism,
                                       kv_reference, long_sequence, overflow_rejected, padding,
                                       prefix_consistency, reference_kv, reference_logits,
                                       signature_agreement, unread_slots, worst)
from harness.records import ERROR, CheckResult
from harness.runners import ReauthoredRunner, TFLiteRunner
from harness.strategies import Case, Shape, seeded_cases

CASES_PER_STAGE = 3
LOGIT_PROPERTIES = ("prefix", "chunked", "signatures", "causality", "padding", "resume")


def shape_of(pair) -> Shape:
    return Shape(int(pair.hf_config.get("vocab_size", 256)), tuple(pair.export.prefill_lens), pair.export.kv_cache_max)


@dataclasses.dataclass
class References:
    """What the HF model says: each case's cached K/V, and the logits of a sequence filling the cache."""

    kv: list[list[tuple[np.ndarray, np.ndarray]]]
    long_tokens: np.ndarray
    long_logits: np.ndarray
    window: int  # the HF config's sliding window, 0 without one

    @classmethod
    def compute(cls, hf_model, pair, cases: list[Case]) -> References:
        rng = np.random.default_rng(pair.seed + 2)
        tokens = rng.integers(1, shape_of(pair).vocab, size=pair.export.kv_cache_max)
        return cls([reference_kv(hf_model, c.prompt) for c in cases], tokens, reference_logits(hf_model, tokens),
                   int(getattr(hf_model.config, "sliding_window", None) or 0))


def _tagged(deviation: Deviation, index: int, case: Case) -> Deviation:
    return dataclasses.replace(deviation, where=f"case {index} {case!r}: {deviation.where}")


def measure_prefill_decode(runners: list, cases: list[Case], prefill_lens) -> tuple[dict, dict]:
    """Properties 1-4 and 7 over the cases: metrics, and where each metric's worst case is."""
    runner, found, nondeterministic = runners[0], {name: [] for name in LOGIT_PROPERTIES}, 0
    for i, case in enumerate(cases):
        pad, resume = padding(runner, case, prefill_lens)
        for name, d in (("prefix", prefix_consistency(runner, case)), ("chunked", chunked_prefill(runner, case)),
                        ("signatures", signature_agreement(runner, case, prefill_lens)),
                        ("causality", causality(runner, case)), ("padding", pad), ("resume", resume)):
            found[name].append(_tagged(d, i, case))
        nondeterministic += determinism(runners, case)
    worsts = {f"{name}_err": worst(found[name]) for name in LOGIT_PROPERTIES}
    metrics = {name: d.max_abs for name, d in worsts.items()}
    metrics["consistency_rel_err"] = _worst_relative(worsts.values())
    metrics["nondeterministic_values"] = nondeterministic
    metrics["logit_scale"] = max(d.scale for found_one in found.values() for d in found_one)
    metrics["cases"] = len(cases)
    return metrics, {name: d.where for name, d in worsts.items()}


def measure_kv_cache(runner, cases: list[Case], references: References, prefill_lens) -> tuple[dict, dict]:
    """Properties 5, 6, 8 and 9 over the cases: metrics, and where each metric's worst case is."""
    sentinel, content, absolute, relative, stray, missed, stray_where = [], [], [], [], 0, 0, ""
    for i, (case, ref) in enumerate(zip(cases, references.kv)):
        sentinel.append(_tagged(unread_slots(runner, case), i, case))
        write = decode_write(runner, case)
        stray, missed = stray + write.stray_slots, missed + write.missed_writes
        stray_where = stray_where or (write.where and f"case {i} {case!r}: {write.where}")
        content.append(_tagged(write.content, i, case))
        kv_ref = kv_reference(runner, case, ref)
        absolute.append(_tagged(kv_ref.absolute, i, case))
        relative.append(_tagged(kv_ref.relative, i, case))
    long = long_sequence(runner, references.long_tokens, prefill_lens, references.long_logits)
    worst_relative = max(relative, key=lambda d: np.inf if np.isnan(d.max_abs) else d.relative)
    metrics = {
        "sentinel_err": worst(sentinel).max_abs, "write_err": worst(content).max_abs,
        "stray_slots": stray, "missed_writes": missed,
        "reference_err": worst(absolute).max_abs, "reference_rel_err": _worst_relative([worst_relative]),
        "long_err": long.deviation.max_abs, "long_mean_kl": long.mean_kl, "long_max_kl": long.max_kl,
        "overflow_rejected": int(overflow_rejected(runner, references.long_tokens)),
        "consistency_rel_err": _worst_relative([worst(sentinel), worst(content)]),
        "long_positions": len(references.long_tokens), "window": references.window, "cases": len(cases),
    }
    where = {"sentinel_err": worst(sentinel).where, "write_err": worst(content).where, "stray_slots": stray_where,
             "missed_writes": stray_where, "reference_err": worst(absolute).where,
             "reference_rel_err": worst_relative.where, "long_err": long.deviation.where,
             "overflow_rejected": "going past kv_cache_max did not raise HarnessError"}
    return metrics, where


def _worst_relative(deviations) -> float:
    values = [d.relative for d in deviations]
    return float("nan") if any(np.isnan(v) for v in values) else max(values, default=0.0)


def property_stages(runners: dict) -> list[str]:
    """The stages the properties hold at: the eager model, the float flatbuffer, every quantized one."""
    return [s for s in runners if s in (stages.REAUTHORED, stages.TFLITE_FLOAT)
            or stages.is_quantized(s)]


def fresh_runner(runner, num_threads: int):
    """A new runner of the same stage: a new interpreter on the same flatbuffer, or a copy of the model."""
    if isinstance(runner, ReauthoredRunner):
        return ReauthoredRunner(copy.deepcopy(runner.model), runner.kv_cache_max)
    if isinstance(runner, TFLiteRunner):
        return TFLiteRunner(runner.path, runner.prefill_lens, runner.kv_cache_max, num_threads)
    return None


def reproduce_commands(pair_name: str, stage: str) -> str:
    """How to re-run one stage's seeded cases, and how to get a failure shrunk to a minimal case."""
    quantized = stage not in (stages.REAUTHORED, stages.TFLITE_FLOAT)
    quant = f" --quant {stages.recipe_of(stage)}" if quantized else ""
    return (f"reproduce: harness verify --models {pair_name} --stages {stage}{quant}; shrink to a minimal case: "
            f"pytest tests/test_properties.py -k '{pair_name} and {stage}'")


def _detail(metrics: dict, thresholds: dict, where: dict, command: str) -> str:
    failed = {key[4:] for key, limit in thresholds.items() if judge(metrics, {key: limit})}
    return "; ".join([f"{name}: {where[name]}" for name in sorted(failed) if where.get(name)] + [command])


def property_checks(state) -> list:
    """`harness verify`'s extra check: prefill_decode and kv_cache records for every property stage."""
    pair = state.pair
    cases = seeded_cases(shape_of(pair), CASES_PER_STAGE, pair.seed)
    references = References.compute(load_hf(pair, state.checkpoint), pair, cases)
    results = []
    for stage in property_stages(state.runners):
        runner = state.runners[stage]
        command = reproduce_commands(pair.name, stage)
        measures = (
            (stages.PREFILL_DECODE, lambda: measure_prefill_decode(
                [r for r in (runner, fresh_runner(runner, state.options.num_threads)) if r],
                cases, pair.export.prefill_lens)),
            (stages.KV_CACHE, lambda: measure_kv_cache(runner, cases, references, pair.export.prefill_lens)),
        )
        for check, measure in measures:
            try:
                metrics, where = measure()
            except HarnessError as e:
                results.append(CheckResult(pair.name, stage, check, ERROR, message=f"{e}; {command}"))
                continue
            gate = state.gate(stage, check)
            results.append(judged(pair.name, stage, check, metrics, gate,
                                   _detail(metrics, gate.thresholds, where, command)))
    return results


property_checks.name = stages.PROPERTIES
