"""summary.md as a PR comment: verdict first, one matrix, failures whole, details folded, under GitHub's limit."""

import copy
import json
from pathlib import Path

from harness import report, summary
from harness.records import CheckResult, run_metadata

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = json.loads((ROOT / "reports" / "sample" / "parity.json").read_text())  # the default suite, 10 pairs


def planted(document, model="qwen3", stage="tflite_float", check="logits"):
    """The document with one record failed, as a regression would fail it."""
    doc = copy.deepcopy(document)
    record = next(r for r in doc["results"] if (r["model"], r["stage"], r["check"]) == (model, stage, check))
    record.update(status="fail", message="max_abs_err=0.5 > 0.0001 (worst at prompt 1 position 3)")
    record["metrics"]["max_abs_err"] = 0.5
    return doc


def test_the_full_default_suite_fits_a_comment_and_a_planted_failure_shows_in_15_lines():
    text = summary.render_summary(planted(SAMPLE))
    assert len(text) < summary.COMMENT_LIMIT
    head = text.splitlines()[:15]
    assert head[0] == "# edge-parity: FAIL (277 pass, 1 fail, 20 skip, 20 xfail)"
    row = next(line for line in head if line.startswith("| **qwen3**"))
    assert "**FAIL** logits max_abs_err 0.5 (≤0.0001)" in row
    assert head.index(row) == min(i for i, line in enumerate(head) if line.startswith("| ") and "---" not in line
                                  and not line.startswith("| pair"))  # failing pairs lead the matrix
    failures = text.index("## Failures")
    assert "max_abs_err=0.5 > 0.0001 (worst at prompt 1 position 3)" in text[failures:text.index("## Pairs")]
    # The failing pair's table first, then as many as fit (5 of the 10 with the bundle stages); the rest are named.
    kept = text.count("<details>")
    assert text.index("<details>") == text.index("<details><summary>qwen3") and text.count("</details>") == kept
    assert kept == len(SAMPLE["models"]) or "left out to fit a PR comment" in text


def test_details_give_way_to_the_budget_and_the_failures_never_do():
    text = summary.render_summary(planted(SAMPLE), budget=20_000)
    assert len(text) <= 20_000
    assert 0 < text.count("<details>") < len(SAMPLE["models"])
    assert text.index("<details>") == text.index("<details><summary>qwen3")  # the failing pair's table comes first
    assert "left out to fit a PR comment" in text and "parity.json" in text
    doc = planted(SAMPLE)
    for r in doc["results"]:
        if r["model"] == "phi2" and r["check"] == "golden":
            r.update(status="fail", message="moved: " + "x" * 3000)
    text = summary.render_summary(doc, budget=12_000)
    assert text.count("moved: " + "x" * 3000) == 6  # each failure whole, past the budget if need be
    assert "<details>" not in text and "left out to fit a PR comment" in text


def test_each_cell_is_the_stage_s_worst_status_and_its_nearest_metric_to_the_gate():
    records = [
        {"stage": "reauthored", "check": "logits", "status": "pass", "message": "",
         "metrics": {"max_abs_err": 2e-5, "min_cosine": 0.9999999999, "top1": 1.0},
         "threshold": {"max_max_abs_err": 1e-4, "min_min_cosine": 0.999999, "min_top1": 1.0}},
        {"stage": "reauthored", "check": "kv_cache", "status": "pass", "message": "",
         "metrics": {"write_err": 9e-5, "stray_slots": 0}, "threshold": {"max_write_err": 1e-4, "max_stray_slots": 0}},
    ]
    assert summary.matrix_cell(records) == "pass kv_cache write_err 9e-05 (≤0.0001)"
    records[0]["status"] = "xfail"
    assert summary.matrix_cell(records) == "xfail logits max_abs_err 2e-05 (≤0.0001)"
    records[1]["status"] = "error"
    assert summary.matrix_cell(records).startswith("**ERROR** kv_cache")
    assert summary.matrix_cell(records, fmt="simple").startswith("ERROR kv_cache")


def test_the_console_gets_the_verdict_matrix_and_failures_without_markdown():
    text = summary.render_summary(planted(SAMPLE), fmt="simple")
    assert text.startswith("# edge-parity: FAIL")
    assert "<details>" not in text and "**" not in text and "| " not in text
    assert "FAIL logits max_abs_err 0.5 (≤0.0001)" in text and "worst at prompt 1 position 3" in text


def test_skipped_pairs_and_shards_are_said():
    doc = report.parity_document(run_metadata(status="complete", changed_since={
        "base": "origin/main", "affected": {"phi2": ["its golden (golden/phi2.json)"]}, "skipped": ["gemma2", "qwen3"]}),
        [CheckResult("phi2", "hf", "sensitivity", "pass")], {})
    text = summary.render_summary(doc)
    assert "Changed since `origin/main`: ran 1 touched pair(s); skipped gemma2, qwen3 (untouched by the change)." in text


def test_sample_size_before_and_after():
    """The issue measured 86,807 characters for this suite's old summary; the comment form fits its budget, which
    leaves room for the workflow's marker and links under GitHub's limit (the pairs whose tables gave way are named:
    the two tests above)."""
    assert len(summary.render_summary(SAMPLE)) <= summary.SUMMARY_BUDGET < summary.COMMENT_LIMIT


def test_a_defect_declared_at_several_stages_is_told_once_per_pair_with_its_stages():
    text = summary.render_summary(SAMPLE, budget=10**7)
    details = text[text.index("<details><summary>tiny_llama"):]
    details = details[:details.index("</details>")]
    (defect,) = SAMPLE["models"]["tiny_llama"]["expected_failures"][:1]
    assert details.count(defect["reason"]) == 1 and details.count("Minimal reproduction:") == 1
    assert f"{defect['name']} at litertlm, litertlm_dynamic_int8 score" in details
    rows = [line for line in details.splitlines() if line.startswith("| litertlm") and "| score |" in line]
    assert len(rows) == 2 and all("XFAIL" in row and "reason below" in row for row in rows)
