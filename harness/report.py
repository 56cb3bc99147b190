"""One writer serialises records to parity.json; summary.md (harness.summary), release.md, JUnit (harness.junit)
and the console are rendered from that JSON.

Every report file of `harness verify` is written here, so each is a view of the same document: the
release gate's section is computed from the records and added to parity.json before release.md is
rendered from that section.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.paths import scrub
from harness.records import ERROR, FAIL, PASS, XFAIL
from harness.stages import GOLDEN
from harness.summary import beside_threshold, overall, render_summary, table_cell

SCHEMA_VERSION = 1
PARITY_JSON = "parity.json"
SUMMARY_MD = "summary.md"
RELEASE_MD = "release.md"



def write_report(path: Path, text: str) -> None:
    """A report file, atomically, with no directory of this machine in it (see paths.scrub)."""
    write_atomic(path, scrub(text))


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside the target and rename it in place, so readers never see half a file."""
    _replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def copy_atomic(source: Path, path: Path) -> None:
    """A copy of `source` at `path`, made as write_atomic makes a report."""
    with open(source, "rb") as src:
        _replace_atomically(path, lambda f: shutil.copyfileobj(src, f))


def _replace_atomically(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report gets what any file the user makes gets
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parity_document(run: dict[str, Any], results: list, models: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "models": models,
        "results": [r.to_json() if hasattr(r, "to_json") else r for r in results],
    }


def write_parity(out_dir: Path, document: dict[str, Any]) -> Path:
    path = Path(out_dir) / PARITY_JSON
    write_report(path, json.dumps(document, indent=1, sort_keys=False, default=str) + "\n")
    return path


def write_reports(out_dir: Path, document: dict[str, Any], final: bool = False, figures=None) -> None:
    """parity.json, then summary.md rendered from the same document; when the run is over (`final`),
    report.html too (its plots take a second or two: not worth redrawing after every pair), its plots kept in
    `figures` (a shared ArtifactCache) if given."""
    write_parity(out_dir, document)
    write_summary(out_dir, document)
    if final:
        from harness.html_report import REPORT_HTML, render_html

        perf = Path(out_dir) / "perf.json"  # harness bench's, when it wrote to the same directory
        write_report(Path(out_dir) / REPORT_HTML,
                     render_html(document, json.loads(perf.read_text()) if perf.is_file() else None, figures))


def write_summary(out_dir: Path, document: dict[str, Any]) -> Path:
    path = Path(out_dir) / SUMMARY_MD
    write_report(path, render_summary(document))
    return path


# ---------------------------------------------------------------- release gate (`verify --against golden`)

def release_summary(document: dict[str, Any]) -> dict[str, Any]:
    """Which models and stages moved since their goldens, and whether within budget: from records only."""
    rows, changes, parity_failures = [], set(), []
    for r in document["results"]:
        if r["check"] == GOLDEN:
            m = r["metrics"]
            changes.update(m.get("provenance_changes", []))
            within = r["status"] in (PASS, XFAIL)
            rows.append({"model": r["model"], "stage": r["stage"], "status": r["status"],
                         "changed": m.get("changed"), "within_budget": within,
                         **{k: m[k] for k in ("max_abs_err", "top1", "greedy_match") if k in m},
                         "threshold": r["threshold"], "message": r["message"]})
        elif r["status"] in (FAIL, ERROR):
            parity_failures.append({"model": r["model"], "stage": r["stage"], "check": r["check"],
                                    "message": r["message"]})
    # Ready only after a whole run: a pair that never ran (interrupted) has no golden rows to fail.
    ready = (bool(rows) and all(row["within_budget"] for row in rows) and not parity_failures
             and overall(document) == "pass")
    models = {}
    for row in rows:
        model = models.setdefault(row["model"], {"changed_stages": [], "within_budget": True, "parity_failures": 0})
        model["changed_stages"] += [row["stage"]] if row["changed"] else []
        model["within_budget"] &= row["within_budget"]
    for failure in parity_failures:
        models.setdefault(failure["model"], {"changed_stages": [], "within_budget": True, "parity_failures": 0})
        models[failure["model"]]["parity_failures"] += 1
    return {"ready": ready, "versions_changed": sorted(changes),
            "changed": [f"{row['model']}/{row['stage']}" for row in rows if row["changed"]],
            "models": models, "stages": rows, "parity_failures": parity_failures}


def render_release(summary: dict[str, Any]) -> str:
    """release.md, rendered from the `release` section of parity.json."""
    lines = [f"# Release readiness: {'READY' if summary['ready'] else 'NOT READY'}", ""]
    lines += ["Differences from the goldens' provenance:", ""]
    lines += [f"- {c}" for c in summary["versions_changed"]] or ["- none"]
    lines += ["", f"Moved since the golden: {', '.join(summary['changed']) or 'nothing'}.", ""]
    lines += [f"- {name}: {'within budget' if m['within_budget'] else 'OVER BUDGET'}"
              + (f", changed: {', '.join(m['changed_stages'])}" if m["changed_stages"] else ", unchanged")
              + (f", {m['parity_failures']} parity failure(s)" if m["parity_failures"] else "")
              for name, m in summary.get("models", {}).items()] + [""]
    table = [[r["model"], r["stage"], r["status"] if r["status"] == PASS else r["status"].upper(),
              {True: "yes", False: "no", None: ""}[r["changed"]], "yes" if r["within_budget"] else "NO",
              *(beside_threshold(r, r["threshold"], m) for m in ("max_abs_err", "top1", "greedy_match")),
              table_cell(r["message"])]
             for r in summary["stages"]]
    lines += [tabulate(table, headers=["model", "stage", "golden", "changed", "within budget", "max_abs_err", "top1",
                                       "greedy_match", "detail"], tablefmt="github"), ""]
    if summary["parity_failures"]:
        lines += ["Parity failures (against HF, independent of the goldens):", ""]
        lines += [f"- {f['model']} {f['stage']} {f['check']}: {f['message']}" for f in summary["parity_failures"]]
    return "\n".join(lines).rstrip() + "\n"


def write_release(out_dir: Path, document: dict[str, Any]) -> Path:
    """The release gate's reports: parity.json with its `release` section, summary.md, and release.md
    rendered from that section; returns release.md's path."""
    document["release"] = release_summary(document)
    write_reports(out_dir, document)
    path = Path(out_dir) / RELEASE_MD
    write_report(path, render_release(document["release"]))
    return path
