"""Prefill/decode consistency and KV-cache correctness on every default-suite pair, driven by Hypothesis;
and, on tiny_llama, a real defect injected for each property to prove it can fail.

Profile: $HYPOTHESIS_PROFILE (ci by default: few derandomized examples; thorough for nightly runs).
A failure prints the shrunk case and the command that re-runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import properties, stages, strategies
from harness import property_measures as measures
from harness.checkpoint import load_hf
from harness.errors import HarnessError
from harness.pairs import discover
from harness.records import FAIL, PASS
from harness.runners import ReauthoredRunner, run_trajectory
from harness.workload import Trajectory

PROFILE = strategies.load_profile()
DEFAULT_PAIRS = [name for name, pair in discover().items() if "default" in pair.suites]
# The hypothesis suites run on a representative set by default (GQA + RoPE; soft-capping + sliding
# window), keeping `nox -s tests` short; every default pair still gets a seeded run of the same
# properties through `harness verify` (test_models.py). EDGE_PARITY_PROPERTY_PAIRS=all (nightly,
# with HYPOTHESIS_PROFILE=thorough) or a comma list selects others.
_WANTED = os.environ.get("EDGE_PARITY_PROPERTY_PAIRS", "tiny_llama,gemma2")
HYPOTHESIS_PAIRS = DEFAULT_PAIRS if _WANTED == "all" else [n for n in DEFAULT_PAIRS if n in _WANTED.split(",")]
STAGE_PARAMS = [pytest.param(name, stage, id=f"{name}-{stage}") for name, pair in discover().items()
                if name in HYPOTHESIS_PAIRS
                for stage in (stages.REAUTHORED, stages.TFLITE_FLOAT, *map(stages.tflite_stage, pair.default_quant))]
per_stage = pytest.mark.parametrize("pair_name, stage", STAGE_PARAMS)


@dataclasses.dataclass
class StageUnderTest:
    """One stage of one pair, with what its properties need; built once per session."""

    pair: object
    stage: str
    runner: object
    fresh: object  # a second runner of the same stage (new interpreter / model copy), or None
    hf_model: object
    gates: object

    @property
    def shape(self) -> strategies.Shape:
        return properties.shape_of(self.pair)

    @property
    def quantized(self) -> bool:
        return self.stage not in (stages.REAUTHORED, stages.TFLITE_FLOAT)

    def thresholds(self, check: str) -> dict:
        return self.gates.thresholds(self.pair.name, self.stage, check)

    def limits(self, check: str, *metrics: str) -> list[float]:
        """The gate's max_ limits of `metrics`; a limit the gates file lacks fails the test, never skips it."""
        thresholds = self.thresholds(check)
        missing = [m for m in metrics if f"max_{m}" not in thresholds]
        assert not missing, f"gates hold no max_{missing} for {self.pair.name} {self.stage} {check}"
        return [thresholds[f"max_{m}"] for m in metrics]


@pytest.fixture(scope="session")
def stage_under_test(property_runs, pairs, gates, options):
    built = {}

    def get(pair_name: str, stage: str) -> StageUnderTest:
        if (pair_name, stage) not in built:
            report = property_runs(pair_name)
            runner = report.state.runners.get(stage)
            if runner is None:
                failed = [r.message for r in report.results if r.stage == stage and r.status != PASS]
                pytest.skip(f"{pair_name} has no runner at {stage}: {failed or 'stage not run'}")
            built[(pair_name, stage)] = StageUnderTest(
                pairs[pair_name], stage, runner, properties.fresh_runner(runner, options.num_threads),
                load_hf(pairs[pair_name], report.state.checkpoint), gates)
        return built[(pair_name, stage)]

    return get


def assert_within(sut: StageUnderTest, check: str, metric: str, deviation: measures.Deviation) -> None:
    """Holds a deviation to the stage's gate: absolute for float stages, relative to scale for quantized ones."""
    thresholds = sut.thresholds(check)
    if f"max_{metric}" in thresholds:
        limit, value = thresholds[f"max_{metric}"], deviation.max_abs
    else:
        limit, value = thresholds["max_consistency_rel_err"], deviation.relative
    assert value <= limit, (f"{sut.pair.name} {sut.stage} {metric}={value:.3g} > {limit:g} ({deviation.where}); "
                            f"reproduce: {reproduce()}")


def reproduce() -> str:
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", "tests/test_properties.py").rsplit(" ", 1)[0]
    return strategies.reproduce_command(nodeid, PROFILE)


def draw_case(data, sut: StageUnderTest) -> strategies.Case:
    return data.draw(strategies.cases(sut.shape), label="case")


# --- 1-4: prefill and decode agree --------------------------------------------------------------

@per_stage
@given(data=st.data())
def test_prefix_prefill_then_decodes_equals_one_prefill(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    deviation = measures.prefix_consistency(sut.runner, draw_case(data, sut))
    assert_within(sut, stages.PREFILL_DECODE, "prefix_err", deviation)


@per_stage
@given(data=st.data())
def test_chunked_prefill_at_offsets_equals_one_shot(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    assert_within(sut, stages.PREFILL_DECODE, "chunked_err", measures.chunked_prefill(sut.runner, draw_case(data, sut)))


@per_stage
@given(data=st.data())
def test_every_prefill_signature_agrees(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    deviation = measures.signature_agreement(sut.runner, draw_case(data, sut), sut.pair.export.prefill_lens)
    assert_within(sut, stages.PREFILL_DECODE, "signatures_err", deviation)


@per_stage
@given(data=st.data())
def test_later_tokens_never_change_earlier_logits(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    assert_within(sut, stages.PREFILL_DECODE, "causality_err", measures.causality(sut.runner, draw_case(data, sut)))


@per_stage
@given(data=st.data())
def test_padding_never_leaks_and_decoding_resumes_at_the_true_length(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    pad, resume = measures.padding(sut.runner, draw_case(data, sut), sut.pair.export.prefill_lens)
    assert_within(sut, stages.PREFILL_DECODE, "padding_err", pad)
    assert_within(sut, stages.PREFILL_DECODE, "resume_err", resume)


# --- 5-6: the cache holds what HF computes, unread slots stay unread, decode writes one slot ----

@per_stage
@given(data=st.data())
def test_cache_holds_the_reference_keys_and_values(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    case = draw_case(data, sut)
    found = measures.kv_reference(sut.runner, case, measures.reference_kv(sut.hf_model, case.prompt))
    if sut.quantized:  # quantization noise, relative to the cache's scale
        (limit,) = sut.limits(stages.KV_CACHE, "reference_rel_err")
        assert found.relative.relative <= limit, f"{found.relative.where}; {reproduce()}"
    else:
        (limit,) = sut.limits(stages.KV_CACHE, "reference_err")
        assert found.absolute.max_abs <= limit, f"{found.absolute.where}; {reproduce()}"


@per_stage
@given(data=st.data())
def test_slots_past_the_sequence_are_never_read(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    assert_within(sut, stages.KV_CACHE, "sentinel_err", measures.unread_slots(sut.runner, draw_case(data, sut)))


@per_stage
@given(data=st.data())
def test_decode_writes_exactly_one_slot_at_input_pos(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    write = measures.decode_write(sut.runner, draw_case(data, sut))
    assert (write.stray_slots, write.missed_writes) == (0, 0), f"{write.where}; reproduce: {reproduce()}"
    assert_within(sut, stages.KV_CACHE, "write_err", write.content)


# --- 7-9: determinism, long sequences, the end of the cache -------------------------------------

@per_stage
@given(data=st.data())
def test_identical_inputs_give_bit_identical_outputs(stage_under_test, pair_name, stage, data):
    sut = stage_under_test(pair_name, stage)
    runners = [r for r in (sut.runner, sut.fresh) if r is not None]
    assert measures.determinism(runners, draw_case(data, sut)) == 0, f"reproduce: {reproduce()}"


@per_stage
def test_a_sequence_filling_the_cache_matches_hf(stage_under_test, pair_name, stage):
    """Up to the last slot, and past the sliding window when the pair has one."""
    sut = stage_under_test(pair_name, stage)
    references = properties.References.compute(sut.hf_model, sut.pair, [])
    assert len(references.long_tokens) == sut.runner.kv_cache_max > references.window  # 0 without a window
    found = measures.long_sequence(sut.runner, references.long_tokens, sut.pair.export.prefill_lens,
                                   references.long_logits)
    metrics = ({"long_mean_kl": found.mean_kl, "long_max_kl": found.max_kl} if sut.quantized
               else {"long_err": found.deviation.max_abs})
    for (name, value), limit in zip(metrics.items(), sut.limits(stages.KV_CACHE, *metrics)):
        assert value <= limit, f"{name}={value:.3g} > {limit:g}: {found.deviation.where}"


@per_stage
def test_going_past_the_end_of_the_cache_is_a_harness_error(stage_under_test, pair_name, stage):
    sut = stage_under_test(pair_name, stage)
    runner, end = sut.runner, sut.runner.kv_cache_max
    tokens = np.arange(1, end + 3) % (sut.shape.vocab - 1) + 1
    with pytest.raises(HarnessError, match="kv_cache_max"):
        run_trajectory(runner, Trajectory(4, tokens))  # positions 0..end: one past the last slot
    with pytest.raises(HarnessError, match="kv_cache_max"):
        runner.decode(1, end, runner.empty_kv())
    with pytest.raises(HarnessError, match="kv_cache_max"):
        runner.prefill_at(tokens[:2], end - 1, runner.empty_kv())
    logits = run_trajectory(runner, Trajectory(4, tokens[:end + 1]))  # the last slot itself works
    assert logits.shape[0] == end and np.isfinite(logits).all()


# --- harness verify: the same properties as per-stage records -----------------------------------

@pytest.mark.parametrize("pair_name", DEFAULT_PAIRS)
def test_verify_records_prefill_decode_and_kv_cache_per_stage(property_runs, pairs, options, pair_name):
    report = property_runs(pair_name)  # verified with the property checks, as `harness verify` does
    results = [r for r in report.results if r.check in (stages.PREFILL_DECODE, stages.KV_CACHE)]
    expected = {(stage, check) for stage in properties.property_stages(report.state.runners)
                for check in (stages.PREFILL_DECODE, stages.KV_CACHE)}
    assert {(r.stage, r.check) for r in results} == expected and len(results) == len(expected)
    failed = [(r.stage, r.check, r.message) for r in results if r.status != PASS]
    assert not failed
    assert all(r.threshold for r in results)  # every record is held to a gate


def test_verify_runs_the_properties_by_default():
    from harness import cli, suite
    from harness.config import RunConfig

    config = RunConfig.from_cli(cli.build_parser().parse_args(["verify"]), "verify")
    assert properties.property_checks in suite.verify_checks(config)
    assert properties.property_checks.name == stages.PROPERTIES


# --- every property can fail: real defects, and which property catches each ---------------------

class WritesOneSlotLate:
    """A runner whose decode writes its K/V at input_pos + 1 and leaves slot input_pos as it was."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, token, pos, kv):
        before = self.inner.kv_layers(kv)
        logits, after = self.inner.decode(token, pos, kv)
        shifted = []
        for (k0, v0), (k1, v1) in zip(before, self.inner.kv_layers(after)):
            k, v = k1.copy(), v1.copy()
            k[:, pos], v[:, pos] = k0[:, pos], v0[:, pos]
            if pos + 1 < k.shape[1]:
                k[:, pos + 1], v[:, pos + 1] = k1[:, pos], v1[:, pos]
            shifted.append((k, v))
        return logits, self.inner.kv_from_layers(shifted)


def sees_the_next_token(model):
    """The re-authored model with its causal mask cache built one diagonal too high."""
    leaky = copy.deepcopy(model)
    size = leaky.mask_cache.shape[-1]
    leaky.mask_cache = torch.triu(torch.full((size, size), float("-inf")), diagonal=2)[None, None]
    return leaky


class IgnoresInputPos(torch.nn.Module):
    """The re-authored model, but positions are always 0..T-1: decode runs as if at position 0."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, tokens, input_pos, kv_cache, export_config=None):
        return self.model(tokens, torch.arange(tokens.shape[1], dtype=torch.int32), kv_cache,
                          export_config=export_config)


def defective_runner(defect: str, sut: StageUnderTest):
    if defect == "writes_one_slot_late":
        return WritesOneSlotLate(sut.runner)
    wrap = sees_the_next_token if defect == "mask_sees_next_token" else IgnoresInputPos
    return ReauthoredRunner(wrap(sut.runner.model), sut.runner.kv_cache_max)


def caught(sut: StageUnderTest, runner, prop: str, cases) -> float:
    """The property's worst violation over the cases, in multiples of its gate (> 1: caught)."""
    pd, kv = sut.thresholds(stages.PREFILL_DECODE), sut.thresholds(stages.KV_CACHE)
    lens = sut.pair.export.prefill_lens
    by_property = {
        "prefix": lambda c: measures.prefix_consistency(runner, c).max_abs / pd["max_prefix_err"],
        "chunked": lambda c: measures.chunked_prefill(runner, c).max_abs / pd["max_chunked_err"],
        "causality": lambda c: measures.causality(runner, c).max_abs / pd["max_causality_err"],
        "padding": lambda c: measures.padding(runner, c, lens)[0].max_abs / pd["max_padding_err"],
        "resume": lambda c: measures.padding(runner, c, lens)[1].max_abs / pd["max_resume_err"],
        "sentinel": lambda c: measures.unread_slots(runner, c).max_abs / kv["max_sentinel_err"],
        "decode_write": lambda c: (lambda w: np.inf if w.stray_slots or w.missed_writes
                                   else w.content.max_abs / kv["max_write_err"])(measures.decode_write(runner, c)),
        "kv_reference": lambda c: measures.kv_reference(runner, c, measures.reference_kv(sut.hf_model, c.prompt))
                                       .absolute.max_abs / kv["max_reference_err"],
    }
    return max(np.nan_to_num(by_property[prop](c), nan=np.inf) for c in cases)


# (defect, stage) -> the properties that must catch it; each also names the stage it is injected at.
CATCHES = {
    # through a flatbuffer the padded prefill leaves garbage, not the sentinel, in the slot read late
    ("writes_one_slot_late", stages.TFLITE_FLOAT): ("prefix", "resume", "decode_write"),
    ("writes_one_slot_late", stages.REAUTHORED): ("prefix", "resume", "sentinel", "decode_write"),
    ("mask_sees_next_token", stages.REAUTHORED): ("causality", "prefix", "chunked", "padding", "sentinel",
                                                  "kv_reference"),
    ("ignores_input_pos", stages.REAUTHORED): ("prefix", "chunked", "resume", "decode_write"),
}
NOT_CAUGHT = {  # properties blind to a defect by design: each looks only where the defect is not
    "writes_one_slot_late": ("causality", "chunked", "padding", "kv_reference"),  # no decode before their reads
    "mask_sees_next_token": (),
    "ignores_input_pos": ("causality", "padding", "kv_reference"),  # prefills at offset 0 are unaffected
}
DEFECT_PARAMS = [pytest.param(defect, stage, prop, id=f"{defect}-{stage}-{prop}")
                 for (defect, stage), found in CATCHES.items() for prop in found]


@pytest.fixture(scope="session")
def defect_cases(stage_under_test):
    """A few fixed cases with several decodes, so that a one-slot-late write is read back."""
    vocab = stage_under_test("tiny_llama", stages.REAUTHORED).shape.vocab
    rng = np.random.default_rng(7)
    cases = []
    for length, split, chunks in ((6, 2, (2, 4)), (9, 5, (3, 3, 3)), (11, 11, (7, 4))):
        cases.append(strategies.Case(prompt=rng.integers(1, vocab, length), split=split, chunks=chunks,
                                     tail=rng.integers(1, vocab, length - split), pad=int(rng.integers(1, vocab)),
                                     continuation=rng.integers(1, vocab, strategies.MAX_CONTINUATION)))
    return cases


@pytest.mark.parametrize("defect, stage, prop", DEFECT_PARAMS)
def test_injected_defect_is_caught(stage_under_test, defect_cases, defect, stage, prop):
    sut = stage_under_test("tiny_llama", stage)
    assert caught(sut, sut.runner, prop, defect_cases[:1]) <= 1  # clean: within the gate
    assert caught(sut, defective_runner(defect, sut), prop, defect_cases) > 100  # far outside it


@pytest.mark.parametrize("defect", sorted(NOT_CAUGHT))
def test_blind_spots_are_as_documented(stage_under_test, defect_cases, defect):
    """Why several properties: each one alone misses some defects."""
    sut = stage_under_test("tiny_llama", stages.REAUTHORED)
    runner = defective_runner(defect, sut)
    for prop in NOT_CAUGHT[defect]:
        assert caught(sut, runner, prop, defect_cases) <= 1, prop


def test_a_defect_fails_verify_records_with_a_reproduce_command(property_runs):
    state = property_runs("tiny_llama").state
    runners = {stages.TFLITE_FLOAT: WritesOneSlotLate(state.runners[stages.TFLITE_FLOAT]),
               stages.REAUTHORED: state.runners[stages.REAUTHORED]}
    results = {(r.stage, r.check): r for r in properties.property_checks(dataclasses.replace(state, runners=runners))}
    assert results[(stages.REAUTHORED, stages.KV_CACHE)].status == PASS
    broken = results[(stages.TFLITE_FLOAT, stages.KV_CACHE)]
    assert broken.status == FAIL and broken.metrics["stray_slots"] > 0 and broken.metrics["missed_writes"] > 0
    assert "expected [" in broken.message
    assert "harness verify --models tiny_llama --stages tflite_float" in broken.message
    assert results[(stages.TFLITE_FLOAT, stages.PREFILL_DECODE)].status == FAIL


def test_a_failing_property_is_shrunk_and_names_its_command(stage_under_test):
    """What a developer sees: Hypothesis shrinks the failing case, the message says how to re-run it."""
    from hypothesis import settings

    sut = stage_under_test("tiny_llama", stages.TFLITE_FLOAT)
    runner = WritesOneSlotLate(sut.runner)

    @settings(**(strategies.PROFILES[strategies.CI] | {"max_examples": 50, "print_blob": False}), deadline=None)
    @given(case=strategies.cases(sut.shape))
    def prefix_holds(case):
        assert_within(sut, stages.PREFILL_DECODE, "prefix_err", measures.prefix_consistency(runner, case))

    with pytest.raises(AssertionError) as failure:
        prefix_holds()
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    assert "reproduce: HYPOTHESIS_PROFILE=" in str(failure.value)
    # shrunk to the shortest prompt and split that still read a late slot back
    assert re.search(r"prompt=array\(\[\s*\d+,\s*\d+\]\)", notes) and "split=1" in notes, notes


def test_nan_cannot_be_the_sentinel(stage_under_test):
    """Why the sentinel is huge but finite: masked slots enter attention with weight 0, and 0 * NaN = NaN."""
    sut = stage_under_test("tiny_llama", stages.TFLITE_FLOAT)
    case = strategies.seeded_cases(sut.shape, 1, seed=0)[0]
    assert np.isnan(measures.unread_slots(sut.runner, case, sentinel=float("nan")).max_abs)
    assert measures.unread_slots(sut.runner, case).max_abs == 0.0
