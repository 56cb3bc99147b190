"""Prefill/decode consistency and KV-cache correctness, as properties of one stage's runner.

Each property is a plain function of a runner (the prefill/decode/empty_kv interface of
harness.runners), a generated `Case` and, where it needs one, reference data from the HF
model; it returns what it measured. `property_checks` holds a fixed, seeded set of cases
per stage to the gates for `harness verify`; tests/test_properties.py drives the same
functions with Hypothesis.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np
import torch

from harness import stages
from harness.checkpoint import load_hf
from harness.checks import kl_divergences, verdict
from harness.errors import HarnessError
from harness.gates import judge
from harness.records import ERROR, CheckResult
from harness.runners import ReauthoredRunner, TFLiteRunner, run_trajectory, signature_for
from harness.strategies import Case, Shape, seeded_cases
from harness.workload import Trajectory

# Fills cache slots that must never be read. Not NaN: a correctly masked slot still enters
# attention with weight exactly 0, and 0 * NaN = NaN (measured: NaN poisons every stage of
# tiny_llama). 1e6 is finite through q.k (|q.k| ~ 1e8 << float32 max, and far below any
# finite mask value's magnitude), and moves the logits by orders of magnitude if read.
SENTINEL = 1e6
SEQ_AXIS = 1  # litert-torch's default KV layout is [batch, slot, heads, head_dim]


@dataclasses.dataclass(frozen=True)
class Deviation:
    """How far a run strays from its reference: worst absolute difference, where, and the reference's scale."""

    max_abs: float  # nan when the run produced a non-finite value
    scale: float  # max |reference|, for budgets relative to it
    where: str = ""

    @classmethod
    def between(cls, got: np.ndarray, want: np.ndarray, where: str = "") -> Deviation:
        got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = float(np.abs(want64).max()) if want64.size else 0.0
        if not np.isfinite(got64).all():
            return cls(float("nan"), scale, f"{where}, non-finite output")
        if not got64.size:
            return cls(0.0, scale, where)
        err = np.abs(got64 - want64)
        worst = np.unravel_index(int(err.argmax()), err.shape)
        return cls(float(err.max()), scale, f"{where} at index {tuple(int(i) for i in worst)}")

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale else self.max_abs

    def __gt__(self, other: Deviation) -> bool:
        return np.isnan(self.max_abs) or (not np.isnan(other.max_abs) and self.max_abs > other.max_abs)


NONE = Deviation(0.0, 0.0)


def worst(deviations) -> Deviation:
    out = NONE
    for d in deviations:
        out = d if d > out else out
    return out


# --- running a stage at any offset ------------------------------------------------------------

def _fixed_lens(runner) -> tuple[int, ...] | None:
    """The prefill signatures of a fixed-shape runner; None for eager PyTorch, which takes any length."""
    return getattr(runner, "prefill_lens", None)


def prefill_at(runner, tokens, start: int, kv, pad_to: int | None = None, pad: int = 0):
    """Prefills `tokens` at positions start.. , padded with `pad` to `pad_to` (default: the smallest
    signature that fits; no padding in eager mode). Returns the real positions' logits and the cache."""
    n, fixed = len(tokens), _fixed_lens(runner)
    if pad_to is None:
        pad_to = signature_for(n, fixed) if fixed else n
    if pad_to < n or (fixed and pad_to not in fixed):
        raise HarnessError(f"cannot prefill {n} tokens through a signature of length {pad_to}; "
                           f"the stage has {fixed or 'any length'}")
    if start < 0 or start + pad_to > runner.kv_cache_max:
        raise HarnessError(f"prefilling {n} tokens (padded to {pad_to}) at position {start} goes past "
                           f"kv_cache_max={runner.kv_cache_max}; start earlier or export a larger KV cache")
    padded = np.full((1, pad_to), pad, np.int32)
    padded[0, :n] = tokens
    positions = np.arange(start, start + pad_to, dtype=np.int32)
    if fixed:
        logits, kv = runner.call(f"prefill_{pad_to}", padded, positions, kv)
    else:
        logits, kv = runner._call(padded, positions, kv)  # the eager runner's raw forward
    return logits[:n], kv


def decode_at(runner, token: int, pos: int, kv):
    """One decode step, refusing positions outside the cache instead of letting the write clamp."""
    if not 0 <= pos < runner.kv_cache_max:
        raise HarnessError(f"decoding at position {pos} goes past kv_cache_max={runner.kv_cache_max} "
                           f"(slots 0..{runner.kv_cache_max - 1}); shorten the sequence or export a larger KV cache")
    return runner.decode(int(token), int(pos), kv)


def generate(runner, prompt, continuation, kv=None, **prefill_kwargs) -> tuple[np.ndarray, object]:
    """Prefill then teacher-forced decodes: logits at every position of prompt + continuation."""
    kv = runner.empty_kv() if kv is None else kv
    logits, kv = prefill_at(runner, prompt, 0, kv, **prefill_kwargs)
    rows = [logits]
    for i, token in enumerate(continuation):
        step, kv = decode_at(runner, token, len(prompt) + i, kv)
        rows.append(np.asarray(step)[None])
    return np.concatenate(rows), kv


# --- the cache as numpy, whatever the runner's container --------------------------------------

_TFLITE_KV = re.compile(r"kv_cache_([kv])_(\d+)$")


def kv_layers(kv) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (K, V) as numpy copies in [batch, slot, heads, head_dim]."""
    if isinstance(kv, dict):
        found = {}
        for name, value in kv.items():
            kind, layer = _TFLITE_KV.search(name).groups()
            found[(int(layer), kind)] = np.array(value, copy=True)
        return [(found[(i, "k")], found[(i, "v")]) for i in range(len(found) // 2)]
    if isinstance(kv, (list, tuple)):
        return [(np.array(kv[i], copy=True), np.array(kv[i + 1], copy=True)) for i in range(0, len(kv), 2)]
    from litert_torch.generative.layers import kv_cache

    if any(entry.kv_layout != kv_cache.KV_LAYOUT_DEFAULT for entry in kv.caches):
        raise HarnessError("the KV cache uses a transposed layout; the KV properties read only the default "
                           "[batch, slot, heads, head_dim] layout")
    return [(e.k_cache.detach().numpy().copy(), e.v_cache.detach().numpy().copy()) for e in kv.caches]


def with_kv_layers(kv, layers):
    """The same container as `kv`, holding `layers`."""
    if isinstance(kv, dict):
        return {name: layers[int(m.group(2))][0 if m.group(1) == "k" else 1].astype(value.dtype)
                for name, value in kv.items() for m in [_TFLITE_KV.search(name)]}
    if isinstance(kv, (list, tuple)):
        return [array for pair in layers for array in pair]
    from litert_torch.generative.layers import kv_cache

    return kv_cache.KVCache(tuple(kv_cache.KVCacheEntry(torch.from_numpy(k.copy()), torch.from_numpy(v.copy()),
                                                        e.kv_layout) for e, (k, v) in zip(kv.caches, layers)))


def filled_kv(runner, value: float):
    return with_kv_layers(runner.empty_kv(), [(np.full_like(k, value), np.full_like(v, value))
                                              for k, v in kv_layers(runner.empty_kv())])


# --- the properties -----------------------------------------------------------------------------

def prefix_consistency(runner, case: Case) -> Deviation:
    """One prefill of prompt + continuation vs prefilling the first `split` tokens and decoding the rest."""
    tokens = np.concatenate([case.prompt, case.continuation])
    whole, _ = prefill_at(runner, tokens, 0, runner.empty_kv())
    stepped, _ = generate(runner, tokens[:case.split], tokens[case.split:])
    return Deviation.between(stepped, whole, f"prefill {case.split} + decodes vs one prefill of {len(tokens)}")


def chunked_prefill(runner, case: Case) -> Deviation:
    """Prefilling the prompt chunk by chunk at its offsets, then one decode, vs one-shot prefill."""
    whole, _ = generate(runner, case.prompt, case.continuation[:1])
    kv, start, rows = runner.empty_kv(), 0, []
    for size in case.chunks:
        logits, kv = prefill_at(runner, case.prompt[start:start + size], start, kv)
        rows.append(logits)
        start += size
    step, _ = decode_at(runner, case.continuation[0], start, kv)
    rows.append(np.asarray(step)[None])
    return Deviation.between(np.concatenate(rows), whole, f"chunks {case.chunks} vs one prefill")


def signature_agreement(runner, case: Case, prefill_lens: tuple[int, ...]) -> Deviation:
    """Every prefill signature the prompt fits (eager: padded to each exported length) gives the same logits."""
    n = len(case.prompt)
    lens = _fixed_lens(runner) or prefill_lens
    reference, _ = generate(runner, case.prompt, case.continuation[:1])
    found = []
    for length in sorted(x for x in lens if x >= n):
        got, _ = generate(runner, case.prompt, case.continuation[:1], pad_to=length)
        found.append(Deviation.between(got, reference, f"prefill_{length} vs the smallest fitting"))
    return worst(found)


def causality(runner, case: Case) -> Deviation:
    """Changing the tokens after position split-1 never changes the logits up to it."""
    altered = np.concatenate([case.prompt[:case.split], case.tail])
    original, _ = prefill_at(runner, case.prompt, 0, runner.empty_kv())
    changed, _ = prefill_at(runner, altered, 0, runner.empty_kv())
    return Deviation.between(changed[:case.split], original[:case.split],
                             f"positions <{case.split} after changing the tokens from {case.split} on")


def padding(runner, case: Case, prefill_lens: tuple[int, ...]) -> tuple[Deviation, Deviation]:
    """Pad tokens (a non-zero id, through the longest signature) never change the real positions,
    and decoding resumes correctly at the true prompt length: (padding, resume)."""
    n = len(case.prompt)
    longest = max(_fixed_lens(runner) or prefill_lens)
    tokens = np.concatenate([case.prompt, case.continuation])
    whole, _ = prefill_at(runner, tokens, 0, runner.empty_kv())
    padded, _ = generate(runner, case.prompt, case.continuation, pad_to=longest, pad=case.pad)
    return (Deviation.between(padded[:n], whole[:n], f"prompt of {n} padded with {case.pad} to {longest}"),
            Deviation.between(padded[n:], whole[n:], f"decodes from position {n} after padding to {longest}"))


def unread_slots(runner, case: Case, sentinel: float = SENTINEL) -> Deviation:
    """Slots at and above the current length are never read: a sentinel-filled cache changes nothing."""
    clean, _ = generate(runner, case.prompt, case.continuation)
    dirty, _ = generate(runner, case.prompt, case.continuation, kv=filled_kv(runner, sentinel))
    return Deviation.between(dirty, clean, f"cache pre-filled with {sentinel:g}")


@dataclasses.dataclass(frozen=True)
class DecodeWrite:
    """What one decode step did to the cache."""

    stray_slots: int  # (layer, K/V, slot) triples other than input_pos whose bits changed
    missed_writes: int  # (layer, K/V) whose slot input_pos did not change
    content: Deviation  # the written slot vs the slot a one-shot prefill writes there
    where: str = ""


def decode_write(runner, case: Case) -> DecodeWrite:
    """Decode writes exactly one slot per layer, at input_pos, with what prefill would write there."""
    n, token = len(case.prompt), case.continuation[0]
    _, before = prefill_at(runner, case.prompt, 0, runner.empty_kv())
    before_layers = kv_layers(before)
    _, after = decode_at(runner, token, n, before)
    _, whole = prefill_at(runner, np.append(case.prompt, token), 0, runner.empty_kv())
    stray, missed, contents, where = 0, 0, [], []
    for layer, (old_pair, new_pair, ref_pair) in enumerate(zip(before_layers, kv_layers(after), kv_layers(whole))):
        for kind, old, new, ref in zip("KV", old_pair, new_pair, ref_pair):
            bits_old, bits_new = np.moveaxis(old, SEQ_AXIS, 0), np.moveaxis(new, SEQ_AXIS, 0)
            changed = np.flatnonzero([not np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                         np.ascontiguousarray(b).view(np.uint8))
                                      for a, b in zip(bits_old, bits_new)])
            others = [int(s) for s in changed if s != n]
            stray += len(others)
            missed += int(n not in changed)
            if others or n not in changed:
                where.append(f"layer {layer} {kind}: changed slots {changed.tolist()}, expected [{n}]")
            contents.append(Deviation.between(np.take(new, n, SEQ_AXIS), np.take(ref, n, SEQ_AXIS),
                                              f"layer {layer} {kind} slot {n}"))
    return DecodeWrite(stray, missed, worst(contents), "; ".join(where))


def differing_values(runs: list[list[np.ndarray]]) -> int:
    """How many values of the later runs are not bit-identical to the first run's."""
    count = 0
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
            count += int((a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1))
                         .any(-1).sum()) if a.shape == b.shape else a.size
    return count


def determinism(runners: list, case: Case) -> int:
    """Identical inputs, repeated on one runner and on fresh ones: values that are not bit-identical."""
    runs = []
    for runner in [runners[0]] + list(runners):
        logits, kv = generate(runner, case.prompt, case.continuation)
        runs.append([logits] + [a for pair in kv_layers(kv) for a in pair])
    return differing_values(runs)


# --- against the HF reference -------------------------------------------------------------------

def reference_kv(hf_model, tokens) -> list[tuple[np.ndarray, np.ndarray]]:
    """The HF model's cached K and V of a prompt, per layer as [slot, heads, head_dim] (a sliding
    layer keeps only its last slots)."""
    with torch.no_grad():
        out = hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None], use_cache=True)
    return [(layer.keys[0].transpose(0, 1).float().numpy(), layer.values[0].transpose(0, 1).float().numpy())
            for layer in out.cache.layers]


def reference_logits(hf_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)[None]).logits[0].float().numpy()


def _grouped(reference: np.ndarray, heads: int) -> np.ndarray:
    """HF's KV heads mapped onto the stage's: equal, or each HF head repeated for its query groups."""
    if reference.shape[1] == heads:
        return reference
    if heads % reference.shape[1]:
        raise HarnessError(f"the stage caches {heads} KV heads, the HF reference {reference.shape[1]}: "
                           "no head grouping maps one onto the other")
    return np.repeat(reference, heads // reference.shape[1], axis=1)


@dataclasses.dataclass(frozen=True)
class KVReference:
    absolute: Deviation  # the tensor with the largest absolute error
    relative: Deviation  # the tensor with the largest error relative to its own scale (K after RoPE and V differ)


def kv_reference(runner, case: Case, reference: list[tuple[np.ndarray, np.ndarray]]) -> KVReference:
    """After prefill, the slots below the prompt length hold the HF reference's keys and values."""
    n = len(case.prompt)
    _, kv = prefill_at(runner, case.prompt, 0, runner.empty_kv())
    layers = kv_layers(kv)
    if len(layers) != len(reference):
        raise HarnessError(f"the stage caches {len(layers)} layers, the HF reference {len(reference)}")
    found = []
    for layer, ((k, v), (ref_k, ref_v)) in enumerate(zip(layers, reference)):
        for kind, got, want in (("K", k, ref_k), ("V", v, ref_v)):
            kept = want.shape[0]  # a sliding HF layer keeps only the last slots
            got = got[0, n - kept:n]
            found.append(Deviation.between(got, _grouped(want, got.shape[1]), f"layer {layer} {kind}"))
    by_relative = max(found, key=lambda d: np.inf if np.isnan(d.max_abs) else d.relative)
    return KVReference(worst(found), by_relative)


@dataclasses.dataclass(frozen=True)
class LongSequence:
    deviation: Deviation
    mean_kl: float
    max_kl: float


def long_sequence(runner, tokens: np.ndarray, prefill_lens: tuple[int, ...], reference: np.ndarray,
                  decoded_tail: int = 4) -> LongSequence:
    """A sequence filling the cache to its last slot (past any sliding window), prefilled in full
    signatures at their offsets and decoded for the last slots, vs the HF logits of the same tokens."""
    positions, longest = len(tokens), max(_fixed_lens(runner) or prefill_lens)
    kv, start, rows = runner.empty_kv(), 0, []
    while start + longest <= positions - decoded_tail:
        logits, kv = prefill_at(runner, tokens[start:start + longest], start, kv)
        rows.append(logits)
        start += longest
    for pos in range(start, positions):
        step, kv = decode_at(runner, tokens[pos], pos, kv)
        rows.append(np.asarray(step)[None])
    logits = np.concatenate(rows)
    kl = kl_divergences([logits], [reference])
    return LongSequence(Deviation.between(logits, reference, f"{positions} positions up to the last slot"),
                        float(kl.mean()), float(kl.max()))


def overflow_rejected(runner, tokens: np.ndarray) -> bool:
    """Going past kv_cache_max through the harness is a HarnessError, not a clamped write."""
    attempts = (
        lambda: run_trajectory(runner, Trajectory(1, np.resize(tokens, runner.kv_cache_max + 2))),
        lambda: decode_at(runner, tokens[0], runner.kv_cache_max, runner.empty_kv()),
        lambda: prefill_at(runner, tokens[:1], runner.kv_cache_max, runner.empty_kv()),
    )
    for attempt in attempts:
        try:
            attempt()
        except HarnessError:
            continue
        return False
    return True


# --- harness verify: a fixed, seeded set of cases per stage, held to the gates ------------------

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
            results.append(verdict(pair.name, stage, check, metrics, gate,
                                   _detail(metrics, gate.thresholds, where, command)))
    return results


property_checks.name = stages.PROPERTIES
