"""Updating goldens: reproducible bytes, a refusal unless forced, and a diff that says what moved."""

import json

from harness import golden
from harness.records import FAIL


def test_rerecording_an_unchanged_run_is_byte_identical_and_keeps_the_date(tiny_llama, tiny_llama_report,
                                                                          gates, recorded, tmp_path, golden_date):
    path = golden.golden_path(recorded, "tiny_llama")
    before = path.read_bytes()
    outcome = golden.update(tiny_llama, tiny_llama_report.state.logits, tiny_llama_report.state.trajectories,
                            tiny_llama_report.results, gates, recorded,
                            today="2099-12-31")
    assert outcome.status == "unchanged" and outcome.diff.endswith("unchanged")
    assert path.read_bytes() == before and json.loads(before)["provenance"]["recorded"] == golden_date


def test_update_refuses_a_stage_that_fails_parity_unless_forced(rope_report, gates, tmp_path, golden_date):
    pair, rep = rope_report
    outcome = golden.update(pair, rep.state.logits, rep.state.trajectories, rep.results, gates, tmp_path, today=golden_date)
    assert outcome.status == "refused" and "reauthored" in outcome.refused
    assert "--force --reason" in outcome.diff and "max_abs_err" in outcome.diff
    assert not golden.golden_path(tmp_path, pair.name).exists()
    forced = golden.update(pair, rep.state.logits, rep.state.trajectories, rep.results, gates, tmp_path,
                           force_reason="RoPE base moved on purpose", today=golden_date)
    assert forced.status == "recorded"
    doc = json.loads(golden.golden_path(tmp_path, pair.name).read_text())
    assert doc["provenance"]["forced"]["reason"] == "RoPE base moved on purpose"
    assert "reauthored" in doc["provenance"]["forced"]["failing"]
    assert doc["stages"]["reauthored"]["parity"] == FAIL


def test_diff_says_what_moved(rope_report, tiny_llama_report, tiny_llama, gates, recorded, golden_date):
    pair, rep = rope_report
    old = golden.load(recorded, tiny_llama)
    new = golden.record(pair, rep.state.logits, rep.state.trajectories, rep.results, gates, recorded=golden_date,
                        versions={**old["provenance"]["versions"], "litert-torch": "9.9.9"})
    text = golden.render_diff(old, new, golden.golden_path(recorded, "tiny_llama"))
    assert "version litert-torch: 0.10.0 -> 9.9.9" in text
    assert "pair definition changed" in text
    assert "reauthored: top-1 token changed at" in text
    assert "reauthored: top-k logits moved by up to" in text and "position" in text
    assert "reauthored: parity pass -> fail" in text
    assert "exported: removed" in text
    assert "hf:" not in text  # the reference did not move
