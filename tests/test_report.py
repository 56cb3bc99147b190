import json
import os
import stat

from harness import report, summary
from harness.records import FAIL, PASS, CheckResult, run_metadata
from harness.stages import GOLDEN


def document():
    results = [
        CheckResult("m", "reauthored", "logits", "pass", {"max_abs_err": 1e-6}, {"max_max_abs_err": 1e-4}),
        CheckResult("m", "tflite_float", "logits", "fail", {"max_abs_err": 0.5}, {"max_max_abs_err": 1e-4},
                    "max_abs_err=0.5 > 0.0001"),
    ]
    return report.parity_document(run_metadata(gates="g.toml"), results, {"m": {"timings": {"hf": 1.0}}})


def test_parity_json_has_the_promised_fields(tmp_path):
    path = report.write_parity(tmp_path, document())
    data = json.loads(path.read_text())
    assert {"torch", "litert-torch", "ai-edge-litert", "transformers"} <= set(data["run"]["versions"])
    assert {"cpu", "cores", "platform"} <= set(data["run"]["host"])
    for record in data["results"]:
        assert set(record) == {"model", "stage", "check", "status", "metrics", "threshold", "message", "defect"}
    assert not list(tmp_path.glob(".parity.json.*")), "no temp file left behind"


def test_summary_shows_threshold_beside_value_and_verdict():
    text = report.render_summary(document())
    assert text.startswith("# edge-parity: FAIL")
    assert "0.5 (≤0.0001)" in text
    assert "1e-06 (≤0.0001)" in text


def test_verdict_ignores_skips_bounded_expected_failures_and_informational_records():
    doc = {"run": {"status": "complete"},
           "results": [{"status": "pass"}, {"status": "skip"}, {"status": "xfail"}, {"status": "info"}]}
    assert report.overall(doc) == "pass"
    assert summary.counts(doc["results"]) == "1 pass, 1 skip, 1 xfail, 1 info"  # info is never counted as a pass
    doc["results"].append({"status": "error"})
    assert report.overall(doc) == "fail"


def test_a_message_stays_one_whole_cell():
    """A `|` in a message must not split the Markdown row, and the numbers at a long message's end are kept."""
    long = "worst at prompt 1 position 12 token 37: " + "x" * 200 + " (|diff| 0.0822 > 0.05)"
    doc = report.parity_document(run_metadata(status="complete"), [CheckResult("m", "tflite_dynamic_int8", "golden", "fail", message=long)], {})
    row = next(line for line in report.render_summary(doc).splitlines() if line.startswith("| tflite_dynamic_int8"))
    assert row.endswith("(\\|diff\\| 0.0822 > 0.05) |")
    cells = [c for c in row.replace("\\|", "").split("|")]
    header = next(line for line in report.render_summary(doc).splitlines() if line.startswith("| stage"))
    assert len(cells) == len(header.split("|"))


def test_reports_get_the_permissions_of_any_file_the_user_makes(tmp_path):
    old = os.umask(0o022)
    try:
        report.write_atomic(tmp_path / "summary.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.md").stat().st_mode) == 0o644


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "x.json"
    report.write_atomic(target, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError

    try:
        report.write_atomic(target, Boom())  # type: ignore[arg-type]
    except Exception:
        pass
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_release_summary_says_what_moved_and_whether_within_budget(tmp_path):
    def result(stage, status, err, changed):
        return CheckResult("m", stage, GOLDEN, status,
                           {"max_abs_err": err, "top1": 1.0, "greedy_match": 1.0, "changed": changed,
                            "provenance_changes": ["litert-torch 0.10.0 (golden) -> 0.11.0 (now)"]},
                           {"max_max_abs_err": 0.05}, "msg").to_json()
    document = {"schema_version": 1, "run": {}, "models": {},
                "results": [result("tflite_float", PASS, 1e-5, False), result("tflite_dynamic_int8", FAIL, 0.2, True),
                            CheckResult("m", "reauthored", "logits", PASS).to_json(),
                            result("stablehlo", "xfail", 0.3, True)]}  # inside a declared defect's band
    path = report.write_release(tmp_path, document)
    release = json.loads((tmp_path / "parity.json").read_text())["release"]
    assert release["ready"] is False and release["changed"] == ["m/tflite_dynamic_int8", "m/stablehlo"]
    assert release["versions_changed"] == ["litert-torch 0.10.0 (golden) -> 0.11.0 (now)"]
    assert [row["within_budget"] for row in release["stages"]] == [True, False, True]
    assert release["models"]["m"] == {"changed_stages": ["tflite_dynamic_int8", "stablehlo"], "within_budget": False,
                                      "parity_failures": 0}
    text = path.read_text()
    assert text.startswith("# Release readiness: NOT READY") and "0.2 (≤0.05)" in text
    assert "- m: OVER BUDGET, changed: tflite_dynamic_int8, stablehlo" in text
    assert report.render_release(release) == text  # the markdown is a view of the JSON section
