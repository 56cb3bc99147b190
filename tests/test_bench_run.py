"""The records of a bench run, the saved baseline, and the gate on real measurements (harness.bench.run)."""

from __future__ import annotations

import json

from harness.bench import report, run, stats
from harness.records import FAIL, PASS


def test_perf_json_fields(perf, bench_artifacts, bench_settings):
    out, _ = perf
    document = json.loads((out / report.PERF_JSON).read_text())
    assert document["run"]["host"]["cores"] >= 1 and document["run"]["host"]["cpu"]
    assert document["run"]["threads"] == [1]
    assert document["bandwidth"]["copy_gbs"] > 0
    assert {a["stage"] for a in document["artifacts"]} == {a.stage for a in bench_artifacts}
    assert len(document["measurements"]) == len(bench_artifacts)
    for m in document["measurements"]:
        assert m["threads"] == 1 and m["size_bytes"] > 0 and m["create_ms"] > 0 and m["first_decode_ms"] > 0
        assert m["peak_rss_mb"] >= m["rss_before_mb"] > 0
        assert set(m["prefill"]) == {str(n) for n in bench_artifacts[0].prefill_lens}
        for p in m["prefill"].values():
            assert p["median_ms"] > 0 and p["tokens_per_s"] > 0
        assert m["decode"]["p90_ms"] >= m["decode"]["median_ms"] > 0 and m["decode"]["tokens_per_s"] > 0
        assert m["decode"]["samples"] == bench_settings.decode_steps
        assert m["binding"]["decode"]["median_ms"] > 0 and "decode_ms" in m["overhead"]
        assert m["efficiency"]["bytes_per_token"] > m["efficiency"]["kv_cache_bytes"] > 0
        assert m["efficiency"]["percent"] > 0
        assert m["vs_pytorch"]["decode_speedup"] > 0
    assert document["verdict"] == "not gated" and document["comparisons"] == []


def test_saved_baseline_loads(perf, bench_artifacts):
    out, _ = perf
    loaded = run.load_baseline(out / "baseline")
    assert set(loaded) == {(a.model, a.recipe) for a in bench_artifacts}
    for a in bench_artifacts:
        assert loaded[(a.model, a.recipe)].path.read_bytes() == a.path.read_bytes()


def test_gate_on_measured_samples(bench_artifacts, bench_settings):
    """Samples of the float artifact against itself pass; the same samples made 20% slower fail."""
    float_artifact = bench_artifacts[0]
    samples = run.interleaved_samples(float_artifact, float_artifact, 1, bench_settings)
    for metric in run.GATED_METRICS:
        base = samples[metric]["baseline"]
        assert len(base) == bench_settings.rounds and min(base) > 0
        assert stats.decide(metric, base, base, 0.05).status == PASS
        assert stats.decide(metric, [x * 0.8 for x in base], base, 0.05).status == FAIL


def test_baseline_comparison_records(perf, bench_artifacts, bench_settings, gates):
    out, _ = perf
    decisions = run.compare_all(bench_artifacts[:1], out / "baseline", 1, bench_settings, gates,
                                echo=lambda line: None)
    assert {d["metric"] for d in decisions} == set(run.GATED_METRICS)
    for d in decisions:
        assert d["status"] in (PASS, FAIL) and d["rounds"] == bench_settings.rounds
        assert len(d["samples"]["candidate"]) == len(d["samples"]["baseline"]) == bench_settings.rounds
    text = report.render_perf(run.perf_document({"host": {}}, None, decisions, None))
    assert "Gate against baseline" in text
