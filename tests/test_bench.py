"""Bench: structure of perf.json, the delegation analysis, and the gate's logic on samples, never on wall-clock."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from harness import bench, bench_delegation, bench_report, bench_stats, cli

from harness.records import FAIL, PASS

FAST = dict(threads=(1,), decode_steps=16, warmup=2, prefill_repeats=2, rounds=3)


@pytest.fixture(scope="module")
def settings(cache):
    return bench.BenchSettings(**FAST, cache_dir=str(cache.root))


@pytest.fixture(scope="module")
def artifacts(tiny_llama, cache):
    return bench.resolve_artifacts([tiny_llama], None, cache, echo=lambda line: None)


@pytest.fixture(scope="module")
def perf(tiny_llama, cache, gates, settings, tmp_path_factory):
    """One small bench of tiny_llama (float and int8, one thread, PyTorch included), saved as a baseline too."""
    out = tmp_path_factory.mktemp("perf")
    document = bench.run_bench([tiny_llama], None, cache, settings, gates, out, save_dir=out / "baseline",
                               echo=lambda line: None)
    return out, document


# --- the gate's statistics, on synthetic samples -------------------------------------------------

def _noisy(rate: float, n: int, seed: int, noise: float = 0.03) -> list[float]:
    return list(rate * np.exp(np.random.default_rng(seed).normal(0, noise, n)))


def test_gate_flags_a_20_percent_slowdown():
    baseline = _noisy(1000.0, 8, seed=1)
    candidate = _noisy(800.0, 8, seed=2)
    decision = bench_stats.decide("decode_tokens_per_s", candidate, baseline, max_slowdown=0.05)
    assert decision.status == FAIL
    assert decision.high < 0.95 and decision.low <= decision.ratio <= decision.high


def test_gate_passes_no_change_and_noise():
    baseline = _noisy(1000.0, 8, seed=3)
    for seed in range(20):
        decision = bench_stats.decide("decode_tokens_per_s", _noisy(1000.0, 8, seed=100 + seed), baseline, 0.05)
        assert decision.status == PASS, decision.message


def test_gate_passes_a_slowdown_inside_the_budget():
    baseline = _noisy(1000.0, 8, seed=4, noise=0.01)
    decision = bench_stats.decide("decode_tokens_per_s", _noisy(980.0, 8, seed=5, noise=0.01), baseline, 0.05)
    assert decision.status == PASS


def test_gate_needs_an_interval_clear_of_the_limit():
    """A 7% slow-down measured with wild noise straddles the 5% limit: no verdict of guilt."""
    baseline = _noisy(1000.0, 4, seed=6, noise=0.3)
    decision = bench_stats.decide("decode_tokens_per_s", _noisy(930.0, 4, seed=7, noise=0.3), baseline, 0.05)
    assert decision.low < 0.95 < decision.high
    assert decision.status == PASS


def test_one_round_gives_no_interval_and_no_failure():
    decision = bench_stats.decide("decode_tokens_per_s", [500.0], [1000.0], 0.05)
    assert math.isnan(decision.low) and decision.status == PASS


def test_decide_rejects_unpaired_samples():
    with pytest.raises(ValueError):
        bench_stats.decide("decode_tokens_per_s", [1.0, 2.0], [1.0], 0.05)


def test_summarize():
    stats = bench_stats.summarize([0.001, 0.002, 0.003, 0.010])
    assert stats["median_ms"] == pytest.approx(2.5) and stats["p90_ms"] > stats["median_ms"] >= stats["min_ms"]
    assert stats["samples"] == 4


def test_gates_hold_the_bench_budget(gates):
    for metric in bench.GATED_METRICS:
        assert 0 < gates.thresholds("tiny_llama", bench.BENCH, metric)["max_slowdown"] < 1


# --- the delegation analysis ---------------------------------------------------------------------

def _op(index, name, inputs, outputs):
    return {"index": index, "op_name": name, "inputs": np.array(inputs), "outputs": np.array(outputs)}


def test_primary_plan_walks_back_from_delegate_outputs():
    ops = [_op(0, "FULLY_CONNECTED", [0, 10], [1]), _op(1, "ADD", [1, 11], [2]),
           _op(2, "STABLEHLO_COMPOSITE", [2], [3]), _op(3, "MUL", [3, 12], [4]),
           _op(4, "DELEGATE", [0, 10, 11], [2]), _op(5, "DELEGATE", [3, 12], [4])]
    interpreter = types.SimpleNamespace(_get_ops_details=lambda: ops)
    plan = bench_delegation.primary_plan(interpreter, {2: "odml.rms_norm"})
    assert plan == {"ops": 4, "delegated": 3, "partitions": 2,
                    "undelegated": {"STABLEHLO_COMPOSITE(odml.rms_norm)": 1}}


def test_swap_subgraph_remaps_every_reference():
    composite = types.SimpleNamespace(decompositionSubgraphIndex=2, name=b"odml.x")
    model = types.SimpleNamespace(
        subgraphs=[types.SimpleNamespace(operators=[], name="a"), types.SimpleNamespace(operators=[], name="b"),
                   types.SimpleNamespace(operators=[types.SimpleNamespace(builtinOptions=None,
                                                                          builtinOptions2=composite)], name="c")],
        signatureDefs=[types.SimpleNamespace(subgraphIndex=0), types.SimpleNamespace(subgraphIndex=2)])
    bench_delegation._swap_subgraph_to_front(model, 2)
    assert [g.name for g in model.subgraphs] == ["c", "b", "a"]
    assert [s.subgraphIndex for s in model.signatureDefs] == [2, 0]
    assert composite.decompositionSubgraphIndex == 0


def test_delegation_of_tiny_llama(artifacts):
    plan = bench_delegation.delegation(artifacts[0].path)
    assert set(plan) == {"decode", *(f"prefill_{n}" for n in artifacts[0].prefill_lens)}
    decode = plan["decode"]
    assert 0 < decode["delegated"] <= decode["ops"] and decode["partitions"] >= 1
    assert "FULLY_CONNECTED" not in decode["undelegated"]
    assert sum(decode["undelegated"].values()) == decode["ops"] - decode["delegated"]


def test_decode_weight_bytes_below_file_size(artifacts):
    for a in artifacts:
        assert 0 < bench_delegation.decode_weight_bytes(a.path) < a.path.stat().st_size


# --- the runtime path measures a real decode -----------------------------------------------------

def test_compiled_runner_decodes_like_the_signature_runner(artifacts, tiny_llama):
    from harness.bench_worker import TOKEN, CompiledRunner
    from harness.runners import TFLiteRunner

    path, lens = artifacts[0].path, tiny_llama.export.prefill_lens
    compiled = CompiledRunner(str(path), 1)
    compiled.prefill(lens[0])
    step = compiled.decode_loop(lens[0])
    reference = TFLiteRunner(path, lens, tiny_llama.export.kv_cache_max, 1)
    _, kv = reference.prefill(np.full(lens[0], TOKEN, np.int32), reference.empty_kv())
    vocab = tiny_llama.hf_config["vocab_size"]
    for pos in range(lens[0], lens[0] + 3):
        step()
        expected, kv = reference.decode(TOKEN, pos, kv)
        got = compiled.outputs["decode"]["logits"].read(vocab, np.float32)
        np.testing.assert_allclose(got, expected.ravel(), rtol=1e-5, atol=1e-5)


# --- perf.json, perf.md, perf.png ----------------------------------------------------------------

def test_perf_json_fields(perf, artifacts):
    out, _ = perf
    document = json.loads((out / bench_report.PERF_JSON).read_text())
    assert document["run"]["host"]["cores"] >= 1 and document["run"]["host"]["cpu"]
    assert document["run"]["threads"] == [1]
    assert document["bandwidth"]["copy_gbs"] > 0
    assert {a["stage"] for a in document["artifacts"]} == {a.stage for a in artifacts}
    assert len(document["measurements"]) == len(artifacts)
    for m in document["measurements"]:
        assert m["threads"] == 1 and m["size_bytes"] > 0 and m["create_ms"] > 0 and m["first_decode_ms"] > 0
        assert m["peak_rss_mb"] >= m["rss_before_mb"] > 0
        assert set(m["prefill"]) == {str(n) for n in artifacts[0].prefill_lens}
        for p in m["prefill"].values():
            assert p["median_ms"] > 0 and p["tokens_per_s"] > 0
        assert m["decode"]["p90_ms"] >= m["decode"]["median_ms"] > 0 and m["decode"]["tokens_per_s"] > 0
        assert m["decode"]["samples"] == FAST["decode_steps"]
        assert m["binding"]["decode"]["median_ms"] > 0 and "decode_ms" in m["overhead"]
        assert m["efficiency"]["bytes_per_token"] > m["efficiency"]["kv_cache_bytes"] > 0
        assert m["efficiency"]["percent"] > 0
        assert m["vs_pytorch"]["decode_speedup"] > 0
    assert document["verdict"] == "not gated" and document["comparisons"] == []


def test_perf_md_and_plot_rendered_from_json(perf):
    out, _ = perf
    document = json.loads((out / bench_report.PERF_JSON).read_text())
    assert (out / bench_report.PERF_MD).read_text() == bench_report.render_perf(document, bench_report.PERF_PNG)
    text = (out / bench_report.PERF_MD).read_text()
    assert "XNNPack delegation" in text and "decode tok/s" in text
    assert (out / bench_report.PERF_PNG).read_bytes()[:4] == b"\x89PNG"


def test_saved_baseline_loads(perf, artifacts):
    out, _ = perf
    loaded = bench.load_baseline(out / "baseline")
    assert set(loaded) == {(a.model, a.recipe) for a in artifacts}
    for a in artifacts:
        assert loaded[(a.model, a.recipe)].path.read_bytes() == a.path.read_bytes()


def test_gate_on_measured_samples(artifacts, settings):
    """Samples of the float artifact against itself pass; the same samples made 20% slower fail."""
    float_artifact = artifacts[0]
    samples = bench.interleaved_samples(float_artifact, float_artifact, 1, settings)
    for metric in bench.GATED_METRICS:
        base = samples[metric]["baseline"]
        assert len(base) == settings.rounds and min(base) > 0
        assert bench_stats.decide(metric, base, base, 0.05).status == PASS
        assert bench_stats.decide(metric, [x * 0.8 for x in base], base, 0.05).status == FAIL


def test_baseline_comparison_records(perf, artifacts, settings, gates):
    out, _ = perf
    decisions = bench.compare_all(artifacts[:1], out / "baseline", 1, settings, gates, echo=lambda line: None)
    assert {d["metric"] for d in decisions} == set(bench.GATED_METRICS)
    for d in decisions:
        assert d["status"] in (PASS, FAIL) and d["rounds"] == settings.rounds
        assert len(d["samples"]["candidate"]) == len(d["samples"]["baseline"]) == settings.rounds
    text = bench_report.render_perf(bench.perf_document({"host": {}}, None, decisions, None))
    assert "Gate against baseline" in text


# --- the command line ----------------------------------------------------------------------------

def _decision(status):
    return {"model": "tiny_llama", "stage": "tflite_float", "recipe": "none", "threads": 1, "metric": "m",
            "ratio": 0.8, "low": 0.7, "high": 0.9, "max_slowdown": 0.05, "rounds": 3, "status": status}


@pytest.mark.parametrize("status,code", [(PASS, cli.EXIT_PASS), (FAIL, cli.EXIT_GATE_FAILED)])
def test_cli_exit_code_follows_the_gate(monkeypatch, tmp_path, status, code):
    monkeypatch.setattr(bench, "run_bench",
                        lambda *a, **k: bench.perf_document({"host": {}}, None, [_decision(status)], None))
    assert cli.main(["bench", "--models", "tiny_llama", "--baseline", str(tmp_path), "--out", str(tmp_path)]) == code


def test_cli_missing_baseline_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["bench", "--models", "tiny_llama", "--baseline", str(tmp_path / "none"), "--gate-only",
                     "--out", str(tmp_path)])
    assert code == cli.EXIT_USAGE and "--save-baseline" in capsys.readouterr().err


def test_cli_rejects_bad_thread_counts(capsys):
    assert cli.main(["bench", "--threads", "0,2"]) == cli.EXIT_USAGE
    assert "--threads 0,2: give positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a number at all: argparse's usage error
        cli.main(["bench", "--threads", "two"])
