"""JUnit XML: one test case per model x stage x check, failures with their messages, CI systems read it."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from harness import junit, report
from harness.records import CheckResult, run_metadata

ROOT = Path(__file__).resolve().parents[1]


def document():
    results = [
        CheckResult("m", "reauthored", "logits", "pass", {"max_abs_err": 1e-6}, {"max_max_abs_err": 1e-4}),
        CheckResult("m", "tflite_float", "logits", "fail", message="max_abs_err=0.5 > 0.0001 <at> & \"there\""),
        CheckResult("m", "stablehlo", "composite_body", "xfail", message="inside its band", defect="GELU_TANH"),
        CheckResult("n", "hf", "stage", "error", message="pair file models/n.py is broken: SyntaxError"),
        CheckResult("o", "hf", "stage", "not_run", message="not run: the run stopped before this pair"),
        CheckResult("o", "hf", "sensitivity", "info"),
    ]
    return report.parity_document(run_metadata(status="complete"), results,
                                  {"m": {"timings": {"reauthored": 1.5, "tflite_float": 0.25}}})


def test_each_record_is_a_test_case_with_its_verdict():
    root = ET.fromstring(junit.render_junit(document()))
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert len(cases) == 6
    failure = cases[("m", "tflite_float.logits")].find("failure")
    assert failure.get("message") == "max_abs_err=0.5 > 0.0001 <at> & \"there\"" and failure.text == failure.get("message")
    assert cases[("n", "hf.stage")].find("error").get("message").endswith("SyntaxError")
    assert "GELU_TANH" in cases[("m", "stablehlo.composite_body")].find("skipped").get("message")
    assert cases[("o", "hf.stage")].find("skipped").get("message").startswith("not_run")
    assert list(cases[("m", "reauthored.logits")]) == [] and list(cases[("o", "hf.sensitivity")]) == []
    assert cases[("m", "reauthored.logits")].get("time") == "1.500"
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert (suites["m"].get("tests"), suites["m"].get("failures"), suites["m"].get("skipped")) == ("3", "1", "1")
    assert suites["n"].get("errors") == "1"


def test_the_sample_run_renders_every_record():
    sample = json.loads((ROOT / "reports" / "sample" / "parity.json").read_text())
    root = ET.fromstring(junit.render_junit(sample))
    assert len(list(root.iter("testcase"))) == len(sample["results"])
    # Not passed and not failed: the declared defects' xfails and the skips (each with its reason).
    not_judged = [r for r in sample["results"] if r["status"] in ("xfail", "skip")]
    assert not list(root.iter("failure")) and len(list(root.iter("skipped"))) == len(not_judged) > 0
