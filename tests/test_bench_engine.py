"""The bundle in the LiteRT-LM engine, measured by `harness bench` beside the float flatbuffer (harness.bench)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from harness.bench import report, run


@pytest.fixture(scope="module")
def engine_perf(tiny_llama, cache, gates, bench_settings, tmp_path_factory):
    """One bench of tiny_llama's float flatbuffer and bundle at 1 and 2 threads, with a second "bundle" that is
    not one (a text file) measured in the same run."""
    out = tmp_path_factory.mktemp("engine-perf")
    broken = out / "not-a-bundle.litertlm"
    broken.write_text("not a bundle\n")
    settings = dataclasses.replace(bench_settings, threads=(1, 2), pytorch=False, engine=True, engine_repeats=2)
    resolved, resolve = [], run.resolve_bundles

    def bundles(*args, **kwargs):
        resolved.extend(resolve(*args, **kwargs))
        return resolved + [run.Bundle("tiny_llama", broken, max(tiny_llama.export.prefill_lens),
                                      tiny_llama.export.kv_cache_max)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "resolve_bundles", bundles)
        document = run.run_bench([tiny_llama], (), cache, settings, gates, out, echo=lambda line: None)
    return out, document, settings, resolved


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_engine_figures_beside_the_interpreters(engine_perf, tiny_llama):
    out, document, settings, _ = engine_perf
    assert document == json.loads((out / report.PERF_JSON).read_text())
    measured = [e for e in document["engine"] if "error" not in e]
    assert sorted(e["threads"] for e in measured) == [1, 2]
    prefill = max(tiny_llama.export.prefill_lens)
    for e in measured:
        assert e["stage"] == "litertlm" and e["path"].endswith("model.litertlm")
        assert e["prefill"]["tokens"] == prefill
        assert e["decode"]["tokens"] == min(settings.decode_steps, tiny_llama.export.kv_cache_max - prefill)
        assert e["repeats"] == e["ttft"]["samples"] == settings.engine_repeats
        for value in (e["prefill"]["tokens_per_s"], e["decode"]["tokens_per_s"], e["ttft"]["median_ms"],
                      e["init_ms"], e["first_init_ms"]):
            assert _finite_positive(value)
        assert e["peak_rss_mb"] >= e["rss_before_mb"] > 0
        # The ratios are of this run's own interpreter figures, at the same thread count and prefill length.
        interpreter = next(m for m in document["measurements"] if m["threads"] == e["threads"])
        assert interpreter["stage"] == "tflite_float"
        versus = e["vs_interpreter"]
        assert versus["compiled"]["decode_tokens_per_s"] == pytest.approx(
            e["decode"]["tokens_per_s"] / interpreter["decode"]["tokens_per_s"])
        assert versus["compiled"]["prefill_tokens_per_s"] == pytest.approx(
            e["prefill"]["tokens_per_s"] / interpreter["prefill"][str(prefill)]["tokens_per_s"])
        assert all(_finite_positive(r) for side in ("compiled", "parity_runner") for r in versus[side].values())
    text = (out / report.PERF_MD).read_text()
    assert "## The bundle in the LiteRT-LM engine" in text
    for runtime in ("LiteRT-LM engine", "CompiledModel", "parity runner"):
        assert sorted(int(line.split("|")[2]) for line in text.splitlines()
                      if line.startswith("| tiny_llama") and f"| {runtime} " in line) == [1, 2]


def test_the_engine_writes_nothing_beside_the_cached_bundle(engine_perf):
    """Its XNNPack cache goes to a temporary directory: the shared cache's entry stays as built."""
    *_, resolved = engine_perf
    assert len(resolved) == 1
    assert sorted(p.name for p in resolved[0].path.parent.iterdir()) == ["key.json", "manifest.json", "model.litertlm"]


def test_a_failing_engine_is_an_error_record_that_loses_nothing_else(engine_perf):
    out, document, *_ = engine_perf
    failed = [e for e in document["engine"] if "error" in e]
    assert sorted(e["threads"] for e in failed) == [1, 2]
    for e in failed:
        assert e["error"].startswith(f"the LiteRT-LM engine failed on {e['path']}: ")
        assert "Failed to create engine: INVALID_ARGUMENT: Invalid magic number" in e["error"]  # from its log
    assert len(document["measurements"]) == 2 and len(document["engine"]) == 4  # the others all measured
    text = (out / report.PERF_MD).read_text()
    assert text.count("thread(s): ERROR the LiteRT-LM engine failed on") == 2
