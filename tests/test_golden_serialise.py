"""Recording a golden document: what it holds, and the same bytes from the same outputs."""

import json

from harness import golden, stages
from harness.config import RunConfig
from harness.pipeline import RunOptions, verify_pair
from harness.records import PASS, isa_features


def test_golden_holds_what_the_issue_asks_and_stays_small(recorded, tiny_llama):
    doc = json.loads(golden.golden_path(recorded, "tiny_llama").read_text())
    assert list(doc) == ["schema_version", "model", "provenance", "format", "prompts", "stages"]
    assert {"recorded", "pair_fingerprint", "reference_key", "python", "versions", "host"} <= set(doc["provenance"])
    assert doc["provenance"]["host"]["isa"] == isa_features() and "avx2" in isa_features()  # x86-64, AVX2 or newer
    assert {"litert-torch", "transformers", "torch", "ai-edge-quantizer"} <= set(doc["provenance"]["versions"])
    entry = doc["stages"]["tflite_dynamic_int8"]
    assert entry["parity"] == PASS and "quant_accuracy" in entry["gates"] and "golden" in entry["gates"]
    assert len(entry["top_k"]) == len(doc["prompts"]) == len(tiny_llama.workload.prompt_lens)
    assert all(len(row["ids"]) == golden.TOP_K for rows in entry["top_k"] for row in rows)
    assert [len(g) for g in entry["greedy"]] == [tiny_llama.workload.new_tokens] * 3
    text = golden.golden_path(recorded, "tiny_llama").read_text()
    assert '"logits": [' in text and text.count("\n") > 300  # one position per line
    assert len(text) < 100_000


def test_an_independent_run_records_the_same_bytes(tiny_llama, tiny_llama_report, gates, cache, golden_date):
    """A second process-independent run (PyTorch, TFLite with XNNPack) rounds to exactly the same golden."""
    wanted = (stages.TFLITE_FLOAT, stages.tflite_stage("dynamic_int8"))
    again = verify_pair(tiny_llama, RunOptions(RunConfig(stages=wanted), gates, cache))
    subset = {k: v for k, v in tiny_llama_report.state.logits.items()
              if k not in (stages.EXPORTED, stages.STABLEHLO)}
    first = golden.record(tiny_llama, subset, tiny_llama_report.state.trajectories, tiny_llama_report.results, gates,
                          recorded=golden_date)
    second = golden.record(tiny_llama, again.state.logits, again.state.trajectories, again.results, gates,
                           recorded=golden_date)
    assert list(second["stages"]) == ["hf", "reauthored", "tflite_float", "tflite_dynamic_int8"]
    assert golden.dumps(first) == golden.dumps(second)
    assert golden.dumps(golden.parse(golden.dumps(first), "x", "tiny_llama")) == golden.dumps(first)
