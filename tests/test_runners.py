"""The runner interface every stage shares (harness/runners.py, StableHLORunner in harness/lowering.py):
prefill at any offset, padding, the refusal of positions past the cache, and the KV cache as numpy pairs;
on tiny_llama's real runners of every float stage."""

from __future__ import annotations

import numpy as np
import pytest

from harness import stages
from harness.errors import HarnessError
from harness.runners import check_positions, run_trajectory, signature_for
from harness.workload import Trajectory

RUNNER_STAGES = (stages.REAUTHORED, stages.EXPORTED, stages.STABLEHLO, stages.TFLITE_FLOAT)
per_stage = pytest.mark.parametrize("stage", RUNNER_STAGES)
ATOL = 1e-4  # the float stages' property budgets (harness/gates.toml): prefill and decode shapes reorder sums
TOKENS = np.random.default_rng(3).integers(1, 256, 20)  # tiny_llama's vocabulary is 256
PAD = 77  # a real token, so that a leak would move the logits


@pytest.fixture(scope="module")
def runners(tiny_llama, tiny_llama_report, cache):
    """The real runner of every float stage; StableHLO's is rebuilt, as the pipeline drops it after its stage,
    from the stage's lowering (through the cache)."""
    from harness.lowering import StableHLORunner, stage_lowering

    state, export = tiny_llama_report.state, tiny_llama.export
    _, (lowered, _, _) = stage_lowering(cache, tiny_llama, state.checkpoint, state.model, state.programs, ())
    found = {stage: state.runners[stage] for stage in RUNNER_STAGES if stage != stages.STABLEHLO}
    return {**found, stages.STABLEHLO: StableHLORunner(lowered, export.prefill_lens, export.kv_cache_max)}


def spy_on_calls(monkeypatch, runner) -> list:
    """Records every (signature, tokens, positions) the runner's `call` receives, and still runs it."""
    seen, real = [], runner.call

    def call(name, tokens, positions, kv):
        seen.append((name, np.array(tokens).tolist(), np.array(positions).tolist()))
        return real(name, tokens, positions, kv)

    monkeypatch.setattr(runner, "call", call)
    return seen


# --- prefill at an offset ----------------------------------------------------------------------

@per_stage
def test_prefill_at_an_offset_continues_one_prefill(runners, stage):
    runner = runners[stage]
    whole, _ = runner.prefill_at(TOKENS[:13], 0, runner.empty_kv())
    head, kv = runner.prefill_at(TOKENS[:5], 0, runner.empty_kv())
    tail, _ = runner.prefill_at(TOKENS[5:13], 5, kv)
    assert whole.shape[0] == 13 and tail.shape[0] == 8
    np.testing.assert_allclose(np.concatenate([head, tail]), whole, atol=ATOL)
    prefilled, _ = runner.prefill(TOKENS[:13], runner.empty_kv())
    assert np.array_equal(prefilled, whole)  # prefill is prefill_at position 0


def test_a_fixed_shape_prefill_pads_to_the_smallest_fitting_signature(runners, monkeypatch):
    runner = runners[stages.TFLITE_FLOAT]
    seen = spy_on_calls(monkeypatch, runner)
    logits, _ = runner.prefill_at(TOKENS[:5], 3, runner.empty_kv(), pad=PAD)
    assert seen == [("prefill_8", [[*TOKENS[:5], PAD, PAD, PAD]], list(range(3, 11)))]
    assert logits.shape[0] == 5
    runner.prefill_at(TOKENS[:9], 0, runner.empty_kv())
    assert seen[-1][0] == "prefill_16" and seen[-1][1][0][9:] == [0] * 7  # pads with 0 by default
    for pad_to in (12, 4):  # not a signature; shorter than the tokens
        with pytest.raises(HarnessError, match=f"cannot prefill 5 tokens through a signature of length {pad_to}"):
            runner.prefill_at(TOKENS[:5], 0, runner.empty_kv(), pad_to=pad_to)


def test_the_eager_runner_prefills_exactly_the_tokens_unless_told_to_pad(runners, monkeypatch):
    runner = runners[stages.REAUTHORED]
    seen = spy_on_calls(monkeypatch, runner)
    runner.prefill_at(TOKENS[:5], 3, runner.empty_kv())
    runner.prefill_at(TOKENS[:5], 3, runner.empty_kv(), pad_to=12, pad=PAD)  # any length: no signatures
    assert [(tokens[0], positions) for _, tokens, positions in seen] == [
        (list(TOKENS[:5]), list(range(3, 8))), ([*TOKENS[:5]] + [PAD] * 7, list(range(3, 15)))]


@per_stage
def test_padding_never_leaks_into_the_logits_or_the_next_decode(runners, stage):
    runner = runners[stage]
    logits, kv = runner.prefill_at(TOKENS[:5], 0, runner.empty_kv())
    step, _ = runner.decode(TOKENS[5], 5, kv)
    padded, padded_kv = runner.prefill_at(TOKENS[:5], 0, runner.empty_kv(), pad_to=16, pad=PAD)
    padded_step, _ = runner.decode(TOKENS[5], 5, padded_kv)  # slots 6..15 hold the pad tokens' K/V
    assert padded.shape == logits.shape  # only the real positions come back
    np.testing.assert_allclose(padded, logits, atol=ATOL)
    np.testing.assert_allclose(padded_step, step, atol=ATOL)


# --- positions past the cache ------------------------------------------------------------------

def test_check_positions_accepts_exactly_the_slots_of_the_cache():
    check_positions(0, 64, 64, "prefilling")
    check_positions(63, 1, 64, "decoding")
    for start, count, written in ((64, 1, "position 64"), (-1, 1, "position -1"), (57, 8, "positions 57..64"),
                                  (0, 65, "positions 0..64")):
        with pytest.raises(HarnessError) as error:
            check_positions(start, count, 64, "prefilling")
        assert str(error.value).startswith(f"prefilling writes {written}, outside the KV cache (kv_cache_max=64")
        assert "export a larger KV cache" in str(error.value)


def test_signature_for_takes_the_smallest_that_fits():
    assert [signature_for(n, (16, 8)) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(HarnessError, match="exceeds the largest prefill signature"):
        signature_for(17, (8, 16))


@per_stage
def test_a_position_past_the_cache_is_a_harness_error_before_any_call(runners, stage, monkeypatch):
    runner, end = runners[stage], runners[stage].kv_cache_max
    written = min(runner.prefill_lens) if runner.prefill_lens else 1  # the positions one token's prefill writes
    runner.prefill_at(TOKENS[:1], end - written, runner.empty_kv())  # the last slots themselves work
    runner.decode(TOKENS[0], end - 1, runner.empty_kv())
    seen = spy_on_calls(monkeypatch, runner)
    attempts = {
        "decode at kv_cache_max": lambda: runner.decode(TOKENS[0], end, runner.empty_kv()),
        "decode at -1": lambda: runner.decode(TOKENS[0], -1, runner.empty_kv()),
        "prefill whose padding passes the end": lambda: runner.prefill_at(TOKENS[:1], end - written + 1,
                                                                          runner.empty_kv()),
        "prefill at -1": lambda: runner.prefill_at(TOKENS[:1], -1, runner.empty_kv()),
        "trajectory one past the end": lambda: run_trajectory(runner, Trajectory(4, np.resize(TOKENS, end + 2))),
    }
    for what, attempt in attempts.items():
        with pytest.raises(HarnessError, match="outside the KV cache"):
            attempt()
        assert not seen, f"{what}: the runner ran before refusing"


# --- the KV cache as numpy pairs ---------------------------------------------------------------

@per_stage
def test_kv_views_round_trip_as_copies(runners, stage):
    runner = runners[stage]
    _, kv = runner.prefill_at(TOKENS[:5], 0, runner.empty_kv())
    layers = runner.kv_layers(kv)
    assert len(layers) == 2 and all(k.shape == v.shape and k.shape[:2] == (1, runner.kv_cache_max) for k, v in layers)
    for i, (k, v) in enumerate(layers):  # a distinct mark per layer and K/V, in a slot nothing wrote
        k[0, 40], v[0, 40] = 2 * i + 1, 2 * i + 2
    back = runner.kv_layers(runner.kv_from_layers(layers))
    for (k, v), (k_back, v_back) in zip(layers, back, strict=True):
        assert np.array_equal(k_back, k) and np.array_equal(v_back, v)
    assert not any(a[0, 40].any() for pair in runner.kv_layers(kv) for a in pair)  # the cache itself is untouched
    step, _ = runner.decode(TOKENS[5], 5, kv)
    again, _ = runner.decode(TOKENS[5], 5, runner.kv_from_layers(runner.kv_layers(kv)))
    assert np.array_equal(again, step)


def test_every_stage_views_its_cache_in_the_same_layout(runners):
    """Layer order, K before V, [batch, slot, heads, head_dim]: the stages' caches agree through their views."""
    def prefilled(runner):
        return runner.kv_layers(runner.prefill_at(TOKENS[:5], 0, runner.empty_kv())[1])

    want = prefilled(runners[stages.REAUTHORED])
    for stage in RUNNER_STAGES[1:]:
        for layer, (got_pair, want_pair) in enumerate(zip(prefilled(runners[stage]), want, strict=True)):
            for kind, got, expected in zip("KV", got_pair, want_pair):
                np.testing.assert_allclose(got[:, :5], expected[:, :5], atol=ATOL,
                                           err_msg=f"{stage} layer {layer} {kind}")


# --- the flatbuffer's runner (CompiledModel) ---------------------------------------------------

def test_the_flatbuffer_runner_computes_what_the_interpreter_computes(runners):
    """CompiledModel with XNNPack's in-memory weight cache (shared by the signatures) runs the kernels the
    Interpreter's XNNPack delegate runs: the same logits and caches, bit for bit, so goldens stay valid."""
    from ai_edge_litert import interpreter as litert

    runner = runners[stages.TFLITE_FLOAT]
    interpreter = litert.Interpreter(model_path=str(runner.path), num_threads=runner.num_threads)
    signature = signature_for(5, runner.prefill_lens)
    tokens = np.zeros((1, signature), np.int32)
    tokens[0, :5] = TOKENS[:5]
    positions = np.arange(signature, dtype=np.int32)
    want = interpreter.get_signature_runner(f"prefill_{signature}")(tokens=tokens, input_pos=positions,
                                                                      **runner.empty_kv())
    logits, kv = runner.call(f"prefill_{signature}", tokens, positions, runner.empty_kv())
    assert np.array_equal(logits, want["logits"][0])
    want_step = interpreter.get_signature_runner("decode")(tokens=np.array([[TOKENS[5]]], np.int32),
                                                            input_pos=np.array([5], np.int32),
                                                            **{k: want[k] for k in kv})
    step, kv = runner.decode(TOKENS[5], 5, kv)
    assert np.array_equal(step, want_step["logits"][0, 0])
    assert all(np.array_equal(kv[k], want_step[k]) for k in kv)


def test_the_flatbuffer_runner_returns_arrays_a_later_call_leaves_alone(runners):
    """Its buffers are reused from call to call; what a call returned must not change with the next one."""
    runner = runners[stages.TFLITE_FLOAT]
    logits, kv = runner.prefill_at(TOKENS[:5], 0, runner.empty_kv())
    kept_logits, kept_kv = logits.copy(), {k: v.copy() for k, v in kv.items()}
    runner.prefill_at(TOKENS[5:10], 0, runner.empty_kv())
    runner.decode(TOKENS[5], 5, kv)
    assert np.array_equal(logits, kept_logits)
    assert all(np.array_equal(kv[k], kept_kv[k]) for k in kv)


def test_the_flatbuffer_runner_refuses_an_input_left_out_or_misshapen(runners, monkeypatch):
    """A buffer keeps the previous call's values: an input left out would silently run on them."""
    runner = runners[stages.TFLITE_FLOAT]
    kv = runner.empty_kv()
    first = sorted(kv)[0]
    runner.decode(3, 0, kv)  # opens the model if a stage released it
    ran = []
    monkeypatch.setattr(runner.model, "run_by_name", lambda *args: ran.append(args))
    with pytest.raises(HarnessError, match=f"takes inputs .*{first}"):
        runner.decode(3, 0, {k: v for k, v in kv.items() if k != first})
    with pytest.raises(HarnessError, match=f"input {first} of signature decode has shape"):
        runner.decode(3, 0, {**kv, first: kv[first][:, :-1]})
    assert not ran
