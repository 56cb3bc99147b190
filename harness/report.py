"""One writer serialises records to parity.json; summary.md and the console are rendered from that JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.paths import scrub
from harness.records import ERROR, FAIL, INFO, PASS, SKIP, XFAIL

SCHEMA_VERSION = 1
PARITY_JSON = "parity.json"
SUMMARY_MD = "summary.md"

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
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def verdict(document: dict[str, Any]) -> str:
    """pass unless some record failed or errored; skips, bounded expected failures and informational
    records do not fail a gate (nor count as passes)."""
    statuses = {r["status"] for r in document["results"]}
    return "fail" if statuses & {FAIL, ERROR} else "pass"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _cell(result: dict[str, Any], metric: str) -> str:
    if metric not in result["metrics"]:
        return ""
    limit = result["threshold"].get(f"max_{metric}", result["threshold"].get(f"min_{metric}"))
    op = "≤" if f"max_{metric}" in result["threshold"] else "≥"
    return _fmt(result["metrics"][metric]) + (f" ({op}{_fmt(limit)})" if limit is not None else "")


def model_table(results: list[dict[str, Any]], fmt: str = "github") -> str:
    """One row per stage x check, the threshold beside each measured value."""
    metrics = [m for m in HEADLINE_METRICS if any(m in r["metrics"] for r in results)]
    rows = []
    for r in results:
        rows.append([r["stage"], r["check"], r["status"].upper() if r["status"] != PASS else "pass"]
                    + [_cell(r, m) for m in metrics] + [r["message"][:160]])
    return tabulate(rows, headers=["stage", "check", "status", *metrics, "message"], tablefmt=fmt)


def counts(results: list[dict[str, Any]]) -> str:
    parts = []
    for status in (PASS, FAIL, ERROR, SKIP, XFAIL, INFO):
        n = sum(r["status"] == status for r in results)
        if n:
            parts.append(f"{n} {status}")
    return ", ".join(parts)


def render_summary(document: dict[str, Any], fmt: str = "github") -> str:
    """Markdown readable in a PR comment: a verdict line, then a table per model."""
    run = document["run"]
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    lines = [f"# edge-parity: {verdict(document).upper()}", "",
             f"{counts(document['results'])}. Gates: `{run.get('gates', '')}`.", "", f"Versions: {versions}.", ""]
    by_model: dict[str, list] = {}
    for r in document["results"]:
        by_model.setdefault(r["model"], []).append(r)
    for model, results in by_model.items():
        info = document["models"].get(model, {})
        timings = info.get("timings", {})
        lines += [f"## {model}: {'FAIL' if {r['status'] for r in results} & {FAIL, ERROR} else 'pass'}", ""]
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
