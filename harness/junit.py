"""JUnit XML, rendered from a parity document, so CI systems list each model x stage x check natively.

One test case per record: classname the model, name `stage.check`. fail -> <failure>, error -> <error>,
skip and not_run -> <skipped>; an xfail (a declared defect inside its band) is skipped with the defect's
name, as pytest reports an xfail; pass and info are plain passes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from harness.records import ERROR, FAIL, NOT_RUN, SKIP, XFAIL


def _testcase(record: dict[str, Any], seconds: float) -> ET.Element:
    case = ET.Element("testcase", classname=record["model"], name=f"{record['stage']}.{record['check']}",
                      time=f"{seconds:.3f}")
    status, message = record["status"], record.get("message") or ""
    if status in (FAIL, ERROR):
        child = ET.SubElement(case, "failure" if status == FAIL else "error", message=message[:500],
                              type=status)
        child.text = message
    elif status in (SKIP, NOT_RUN):
        ET.SubElement(case, "skipped", message=f"{status}: {message}" if message else status)
    elif status == XFAIL:
        ET.SubElement(case, "skipped", message=f"xfail ({record.get('defect')}): {message}")
    return case


def render_junit(document: dict[str, Any]) -> str:
    """The document as <testsuites>, one <testsuite> per model; a stage's seconds go to its first check."""
    root = ET.Element("testsuites", name="edge-parity")
    by_model: dict[str, list] = {}
    for record in document["results"]:
        by_model.setdefault(record["model"], []).append(record)
    for model, records in by_model.items():
        timings = dict(document["models"].get(model, {}).get("timings", {}))
        suite = ET.SubElement(root, "testsuite", name=model, tests=str(len(records)),
                              failures=str(sum(r["status"] == FAIL for r in records)),
                              errors=str(sum(r["status"] == ERROR for r in records)),
                              skipped=str(sum(r["status"] in (SKIP, NOT_RUN, XFAIL) for r in records)))
        for record in records:
            suite.append(_testcase(record, float(timings.pop(record["stage"], 0.0))))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
