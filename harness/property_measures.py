"""Prefill/decode consistency and KV-cache correctness, as properties of one stage's runner.

Each property is a plain function of a runner (the interface of harness.runners: prefill_at,
decode, empty_kv and the KV cache as per-layer numpy pairs), a generated `Case` and, where it
needs one, reference data from the HF model; it returns what it measured. harness.properties
holds a fixed, seeded set of cases per stage to the gates for `harness verify`;
tests/test_properties.py drives the same functions with Hypothesis.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from harness.checks import kl_divergences
from harness.errors import HarnessError
from harness.runners import run_trajectory, teacher_forced
from harness.strategies import Case
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


def filled_kv(runner, value: float):
    """An empty cache of the runner with every slot set to `value`."""
    return runner.kv_from_layers([(np.full_like(k, value), np.full_like(v, value))
                                  for k, v in runner.kv_layers(runner.empty_kv())])


# --- the properties -----------------------------------------------------------------------------

def prefix_consistency(runner, case: Case) -> Deviation:
    """One prefill of prompt + continuation vs prefilling the first `split` tokens and decoding the rest."""
    tokens = np.concatenate([case.prompt, case.continuation])
    whole, _ = runner.prefill_at(tokens, 0, runner.empty_kv())
    stepped, _ = teacher_forced(runner, tokens[:case.split], tokens[case.split:])
    return Deviation.between(stepped, whole, f"prefill {case.split} + decodes vs one prefill of {len(tokens)}")


def chunked_prefill(runner, case: Case) -> Deviation:
    """Prefilling the prompt chunk by chunk at its offsets, then one decode, vs one-shot prefill."""
    whole, _ = teacher_forced(runner, case.prompt, case.continuation[:1])
    kv, start, rows = runner.empty_kv(), 0, []
    for size in case.chunks:
        logits, kv = runner.prefill_at(case.prompt[start:start + size], start, kv)
        rows.append(logits)
        start += size
    step, _ = runner.decode(int(case.continuation[0]), start, kv)
    rows.append(np.asarray(step)[None])
    return Deviation.between(np.concatenate(rows), whole, f"chunks {case.chunks} vs one prefill")


def signature_agreement(runner, case: Case, prefill_lens: tuple[int, ...]) -> Deviation:
    """Every prefill signature the prompt fits (eager: padded to each exported length) gives the same logits."""
    n = len(case.prompt)
    lens = runner.prefill_lens or prefill_lens
    reference, _ = teacher_forced(runner, case.prompt, case.continuation[:1])
    found = []
    for length in sorted(x for x in lens if x >= n):
        got, _ = teacher_forced(runner, case.prompt, case.continuation[:1], pad_to=length)
        found.append(Deviation.between(got, reference, f"prefill_{length} vs the smallest fitting"))
    return worst(found)


def causality(runner, case: Case) -> Deviation:
    """Changing the tokens after position split-1 never changes the logits up to it."""
    altered = np.concatenate([case.prompt[:case.split], case.tail])
    original, _ = runner.prefill_at(case.prompt, 0, runner.empty_kv())
    changed, _ = runner.prefill_at(altered, 0, runner.empty_kv())
    return Deviation.between(changed[:case.split], original[:case.split],
                             f"positions <{case.split} after changing the tokens from {case.split} on")


def padding(runner, case: Case, prefill_lens: tuple[int, ...]) -> tuple[Deviation, Deviation]:
    """Pad tokens (a non-zero id, through the longest signature) never change the real positions,
    and decoding resumes correctly at the true prompt length: (padding, resume)."""
    n = len(case.prompt)
    longest = max(runner.prefill_lens or prefill_lens)
    tokens = np.concatenate([case.prompt, case.continuation])
    whole, _ = runner.prefill_at(tokens, 0, runner.empty_kv())
    padded, _ = teacher_forced(runner, case.prompt, case.continuation, pad_to=longest, pad=case.pad)
    return (Deviation.between(padded[:n], whole[:n], f"prompt of {n} padded with {case.pad} to {longest}"),
            Deviation.between(padded[n:], whole[n:], f"decodes from position {n} after padding to {longest}"))


def unread_slots(runner, case: Case, sentinel: float = SENTINEL) -> Deviation:
    """Slots at and above the current length are never read: a sentinel-filled cache changes nothing."""
    clean, _ = teacher_forced(runner, case.prompt, case.continuation)
    dirty, _ = teacher_forced(runner, case.prompt, case.continuation, kv=filled_kv(runner, sentinel))
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
    _, before = runner.prefill_at(case.prompt, 0, runner.empty_kv())
    before_layers = runner.kv_layers(before)
    _, after = runner.decode(int(token), n, before)
    _, whole = runner.prefill_at(np.append(case.prompt, token), 0, runner.empty_kv())
    after_layers, whole_layers = runner.kv_layers(after), runner.kv_layers(whole)
    stray, missed, contents, where = 0, 0, [], []
    for layer, (old_pair, new_pair, ref_pair) in enumerate(zip(before_layers, after_layers, whole_layers)):
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
        logits, kv = teacher_forced(runner, case.prompt, case.continuation)
        runs.append([logits] + [a for pair in runner.kv_layers(kv) for a in pair])
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
    _, kv = runner.prefill_at(case.prompt, 0, runner.empty_kv())
    layers = runner.kv_layers(kv)
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
    positions, longest = len(tokens), max(runner.prefill_lens or prefill_lens)
    kv, start, rows = runner.empty_kv(), 0, []
    while start + longest <= positions - decoded_tail:
        logits, kv = runner.prefill_at(tokens[start:start + longest], start, kv)
        rows.append(logits)
        start += longest
    for pos in range(start, positions):
        step, kv = runner.decode(int(tokens[pos]), pos, kv)
        rows.append(np.asarray(step)[None])
    logits = np.concatenate(rows)
    kl = kl_divergences([logits], [reference])
    return LongSequence(Deviation.between(logits, reference, f"{positions} positions up to the last slot"),
                        float(kl.mean()), float(kl.max()))


def overflow_rejected(runner, tokens: np.ndarray) -> bool:
    """Going past kv_cache_max through the harness is a HarnessError, not a clamped write."""
    attempts = (
        lambda: run_trajectory(runner, Trajectory(1, np.resize(tokens, runner.kv_cache_max + 2))),
        lambda: runner.decode(int(tokens[0]), runner.kv_cache_max, runner.empty_kv()),
        lambda: runner.prefill_at(tokens[:1], runner.kv_cache_max, runner.empty_kv()),
    )
    for attempt in attempts:
        try:
            attempt()
        except HarnessError:
            continue
        return False
    return True

