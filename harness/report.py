"""One writer serialises records to parity.json; summary.md, release.md and the console are rendered from that JSON.

Every report file of `harness verify` is written here, so each is a view of the same document: the
release gate's section is computed from the records and added to parity.json before release.md is
rendered from that section.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.paths import scrub
from harness.records import COMPLETE, ERROR, FAIL, INFO, INTERRUPTED, NOT_RUN, PASS, SKIP, XFAIL
from harness.stages import DIVERGENCE, GOLDEN

SCHEMA_VERSION = 1
PARITY_JSON = "parity.json"
SUMMARY_MD = "summary.md"
RELEASE_MD = "release.md"

# The metrics worth a column; the JSON keeps them all.
HEADLINE_METRICS = ("max_abs_err", "min_cosine", "top1", "match", "ppl", "ppl_ratio_vs_hf", "mean_kl", "p99_kl", "max_kl",
                    "entropy_ratio", "unused_tensors", "unloaded_params")


def write_report(path: Path, text: str) -> None:
    """A report file, atomically, with no directory of this machine in it (see paths.scrub)."""
    write_atomic(path, scrub(text))


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside the target and rename it in place, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report gets what any file the user makes gets
        with os.fdopen(fd, "w") as f:
            f.write(text)
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


def overall(document: dict[str, Any]) -> str:
    """The run's verdict: interrupted (stopped by the user), fail (a record failed or errored), incomplete
    (something asked for has not run: never a pass), else pass. Skips, bounded expected failures and
    informational records do not fail a gate (nor count as passes)."""
    statuses = {r["status"] for r in document["results"]}
    run_status = document["run"].get("status", COMPLETE)
    if run_status == INTERRUPTED:
        return "interrupted"
    if statuses & {FAIL, ERROR}:
        return "fail"
    return "incomplete" if NOT_RUN in statuses or run_status != COMPLETE else "pass"


def table_cell(text: str, fmt: str = "github") -> str:
    """A message as one table cell: a newline would end the row, and in Markdown a `|` the cell."""
    cell = " ".join(str(text).split())
    return cell.replace("|", "\\|") if fmt == "github" else cell


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def beside_threshold(values: dict[str, Any], threshold: dict[str, Any], metric: str) -> str:
    """A measured value with the threshold it is held to beside it, as every table shows it; empty when
    the metric was not measured."""
    if metric not in values:
        return ""
    limit = threshold.get(f"max_{metric}", threshold.get(f"min_{metric}"))
    op = "≤" if f"max_{metric}" in threshold else "≥"
    return _fmt(values[metric]) + (f" ({op}{_fmt(limit)})" if limit is not None else "")


def model_table(results: list[dict[str, Any]], fmt: str = "github") -> str:
    """One row per stage x check, the threshold beside each measured value."""
    metrics = [m for m in HEADLINE_METRICS if any(m in r["metrics"] for r in results)]
    rows = []
    for r in results:
        rows.append([r["stage"], r["check"], r["status"].upper() if r["status"] != PASS else "pass"]
                    + [beside_threshold(r["metrics"], r["threshold"], m) for m in metrics]
                    + [table_cell(r["message"], fmt)])  # whole: the numbers that explain a failure come last
    return tabulate(rows, headers=["stage", "check", "status", *metrics, "message"], tablefmt=fmt)


def counts(results: list[dict[str, Any]]) -> str:
    parts = []
    for status in (PASS, FAIL, ERROR, NOT_RUN, SKIP, XFAIL, INFO):
        n = sum(r["status"] == status for r in results)
        if n:
            parts.append(f"{n} {status}")
    return ", ".join(parts)


def divergence_line(record: dict[str, Any]) -> str:
    """A divergence record in one line: where a failing stage first departs from its parent."""
    m = record["metrics"]
    if m.get("point") is None:
        return f"nothing diverges: {record['stage']} within {_fmt(m['tolerance'])} at every matched point"
    return (f"first divergence: {record['stage']}, {m['label']}, position {m['position']} "
            f"({_fmt(m['error'])}, tolerance {_fmt(m['tolerance'])})")


def render_summary(document: dict[str, Any], fmt: str = "github") -> str:
    """Markdown readable in a PR comment: a verdict line, then a table per model."""
    run = document["run"]
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    lines = [f"# edge-parity: {overall(document).upper()}", "",
             f"{counts(document['results'])}. Gates: `{run.get('gates', '')}`.", ""]
    if run.get("stopped"):
        lines += [f"**{run['stopped']}**", ""]
    lines += [f"Versions: {versions}.", ""]
    by_model: dict[str, list] = {}
    for r in document["results"]:
        by_model.setdefault(r["model"], []).append(r)
    for model, results in by_model.items():
        info = document["models"].get(model, {})
        timings = info.get("timings", {})
        lines += [f"## {model}: {'FAIL' if {r['status'] for r in results} & {FAIL, ERROR} else 'pass'}", ""]
        lines += [line for r in results if r["check"] == DIVERGENCE for line in (divergence_line(r), "")]
        if info.get("description"):
            lines += [info["description"], ""]
        lines += [model_table(results, fmt), ""]
        for defect in info.get("expected_failures", []):
            band = ", ".join(f"{m} in [{lo:.3g}, {hi:.3g}]" for m, (lo, hi) in defect["band"].items())
            lines += [f"Declared upstream defect {defect['name']} at {defect['stage']} {defect['check']} "
                      f"(excused only within {band}): {defect['reason']}", ""]
            if defect.get("reproduction"):
                lines += ["Minimal reproduction:", "", "```python", defect["reproduction"].strip(), "```", ""]
        if timings:
            lines += ["Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
        for key, value in info.get("notes", {}).items():
            if key == "artifacts":  # sha256 prefixes: enough to tell two runs' artifacts apart
                value = ", ".join(f"{name} {_short_digest(entry['sha256'])}" for name, entry in value.items())
            elif isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(f"- {key}: {value}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _short_digest(digest) -> str:
    if isinstance(digest, dict):  # every file of an entry (a checkpoint): its weights
        digest = next((d for name, d in digest.items() if name.endswith(".safetensors")), None)
    return (digest or "?")[:12]


def write_reports(out_dir: Path, document: dict[str, Any]) -> None:
    """parity.json, then summary.md rendered from the same document."""
    write_parity(out_dir, document)
    write_summary(out_dir, document)


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
