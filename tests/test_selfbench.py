"""The harness's own benchmark (harness/selfbench.py): real runs of harness verify, cold and warm."""

from __future__ import annotations

import json
import re

import pytest

from harness import selfbench


def test_a_cold_and_a_warm_run_say_where_the_time_went(tmp_path):
    code = selfbench.main(["--rounds", "1", "--out", str(tmp_path), "--",
                           "--models", "tiny_llama", "--stages", "hf,reauthored"])
    assert code == 0
    data = json.loads((tmp_path / selfbench.SELFBENCH_JSON).read_text())
    cold, warm = data["sides"]["new"]["cold"], data["sides"]["new"]["warm"]
    assert cold["exits"] == [0] and warm["exits"] == [0]
    assert cold["cache"]["misses"] >= 1 and warm["cache"] == {"hits": cold["cache"]["misses"], "misses": 0}
    for run in (cold, warm):
        assert {"hf", "reauthored"} <= set(run["stages_s"])
        assert {"checkpoint", "hf_reference", "reauthored_build"} <= set(run["parts_s"])
        assert run["wall_s"] > sum(run["stages_s"].values()) and run["outside_stages_s"] > 0
    text = (tmp_path / selfbench.SELFBENCH_MD).read_text()
    assert "## cold" in text and "## warm" in text and "(checkpoint)" in text
    assert str(tmp_path) not in text  # no directory of this machine in the report


def _run(wall, stages, records, parts=None):
    return {"wall_s": wall, "exit": 0, "jobs": 1, "stages_s": stages, "parts_s": parts or {}, "cache": {"hits": 0, "misses": 0},
            "status": "complete", "records": records}


def record(stage, check, status, value=1.0, model="p"):
    """A record as parity.json holds it, serialised as selfbench.profile keeps it."""
    return json.dumps({"model": model, "stage": stage, "check": check, "status": status, "metrics": {"v": value}},
                      sort_keys=True)


def test_ratios_are_new_over_base_and_differing_records_are_said():
    same, other = [record("hf", "sensitivity", "pass")], [record("hf", "sensitivity", "pass", 2.0)]
    runs = {"base": {"cold": [_run(100.0, {"hf": 40.0}, same)], "warm": [_run(50.0, {"hf": 20.0}, same)] * 2},
            "new": {"cold": [_run(60.0, {"hf": 30.0}, same)], "warm": [_run(20.0, {"hf": 10.0}, other)] * 2}}
    summary = selfbench.summarise(runs)
    assert summary["ratios"] == {"cold": {"wall": 0.6}, "warm": {"wall": 0.4}}
    assert summary["same_records"] == {"cold": True, "warm": False}
    assert summary["sides"]["new"]["cold"]["outside_stages_s"] == 30.0
    text = selfbench.render(summary, {"pairs": "x", "new": "this checkout", "base": "b", "host": "h", "rounds": 2})
    assert re.search(r"\| wall +\| +100 \| +60 \| +0\.6 ", text), text
    assert "Same records (timings aside): yes" in text and "Same records (timings aside): NO" in text


def test_records_that_differ_are_told_apart_by_check_and_status():
    """Against a commit with fewer checks: what only one side ran, every verdict that moved, and values that moved
    under the same verdict."""
    base = [record("hf", "sensitivity", "pass"), record("tflite_float", "logits", "pass"),
            record("stablehlo", "logits", "xfail"), record("old", "gone", "pass")]
    new = [record("hf", "sensitivity", "pass"), record("tflite_float", "logits", "pass", 2.0),
           record("stablehlo", "logits", "fail"), record("litertlm", "score", "pass"),
           record("litertlm", "score", "pass", model="q")]
    runs = {side: {"cold": [_run(10.0, {}, records)]} for side, records in (("base", base), ("new", new))}
    changes = selfbench.summarise(runs)["record_changes"]["cold"]
    assert changes == {"only_base": {"old.gone": 1}, "only_new": {"litertlm.score": 2}, "in_both": 3,
                       "status_changed": [{"model": "p", "stage": "stablehlo", "check": "logits", "base": "xfail",
                                           "new": "fail"}],
                       "other_values": 1}
    text = selfbench.render_record_changes(changes)
    assert "Checks only new ran: litertlm.score x2." in text and "- p stablehlo.logits: xfail -> fail" in text
    same = selfbench.summarise({side: {"cold": [_run(10.0, {}, base)]} for side in ("base", "new")})
    assert same["same_records"] == {"cold": True} and same["record_changes"] == {}


def test_a_base_that_is_no_commit_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="--base 'no-such-ref' is not a commit"):
        selfbench.main(["--base", "no-such-ref", "--out", str(tmp_path)])
