import json

from harness import report
from harness.records import CheckResult, run_metadata


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
    doc = {"results": [{"status": "pass"}, {"status": "skip"}, {"status": "xfail"}, {"status": "info"}]}
    assert report.verdict(doc) == "pass"
    assert report.counts(doc["results"]) == "1 pass, 1 skip, 1 xfail, 1 info"  # info is never counted as a pass
    doc["results"].append({"status": "error"})
    assert report.verdict(doc) == "fail"


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
