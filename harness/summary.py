"""summary.md, rendered from a parity document for a PR comment a reviewer reads in ten seconds.

The verdict and counts on the first line; one matrix of pairs by stages, each cell the worst measurement
against its gate (failing pairs first, failures in bold); every failure with its message; then each pair's
full table folded in <details>. GitHub refuses a comment over 65,536 characters: the folded tables give way
(a pointer to the reports artifact replaces them), the verdict, the matrix and the failures never do.
"""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from harness import stages
from harness.affected import verify_command
from harness.records import COMPLETE, ERROR, FAIL, INFO, INTERRUPTED, NOT_RUN, PASS, SKIP, XFAIL

COMMENT_LIMIT = 65_536  # characters GitHub accepts in a PR comment
SUMMARY_BUDGET = COMMENT_LIMIT - 4_096  # room for the workflow's marker and links around the summary

# The metrics worth showing when ungated; the JSON keeps them all.
HEADLINE_METRICS = ("max_abs_err", "min_cosine", "top1", "match", "ppl", "ppl_ratio_vs_hf", "mean_kl", "p99_kl", "max_kl",
                    "entropy_ratio", "unused_tensors", "unloaded_params")
# Worst first: which record of a stage speaks for it in the matrix, and which pairs lead it.
SEVERITY = {ERROR: 0, FAIL: 1, NOT_RUN: 2, XFAIL: 3, SKIP: 4, PASS: 5, INFO: 6}


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


def counts(results: list[dict[str, Any]]) -> str:
    parts = []
    for status in (PASS, FAIL, ERROR, NOT_RUN, SKIP, XFAIL, INFO):
        n = sum(r["status"] == status for r in results)
        if n:
            parts.append(f"{n} {status}")
    return ", ".join(parts)


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


def closeness(value: Any, threshold: dict[str, Any], metric: str) -> float:
    """How near a value is to its gate: 1 at the gate, above 1 past it. A floor at or below 1 on a metric
    that tops out at 1 (cosine, top-1, overlap) is measured on the cost 1 - value, so 0.9999999 against
    0.999999 is far from its gate. A value exactly at an exact gate (0 stray slots, top-1 of 1.0) ranks
    lowest: meeting it is the normal case, not the one to look at."""
    if not isinstance(value, (int, float)):
        return -1.0
    if f"max_{metric}" in threshold:
        limit, cost = threshold[f"max_{metric}"], value
    elif f"min_{metric}" in threshold:
        limit = threshold[f"min_{metric}"]
        if limit <= 1 and value <= 1:
            limit, cost = 1 - limit, 1 - value
        else:
            limit, cost = 1 / limit if limit else 0.0, 1 / value if value else float("inf")
    else:
        return -1.0
    if cost == limit:
        return 0.0
    return cost / limit if limit > 0 else float("inf") if cost > limit else 0.0


def worst_metric(record: dict[str, Any]) -> str | None:
    """The gated metric of a record nearest to (or furthest past) its gate."""
    gated = [m for m in record["metrics"] if f"max_{m}" in record["threshold"] or f"min_{m}" in record["threshold"]]
    if not gated:
        return None
    return max(gated, key=lambda m: (closeness(record["metrics"][m], record["threshold"], m), m))


def matrix_cell(records: list[dict[str, Any]], fmt: str = "github") -> str:
    """A stage of a pair in one cell: its worst status, and its worst metric against the gate."""
    if not records:
        return ""
    worst = min(SEVERITY[r["status"]] for r in records)
    chosen = [r for r in records if SEVERITY[r["status"]] == worst]
    record = max(chosen, key=lambda r: max((closeness(r["metrics"][m], r["threshold"], m)
                                            for m in [worst_metric(r)] if m), default=-2.0))
    status = record["status"]
    label = {FAIL: "FAIL", ERROR: "ERROR"}.get(status, status.replace("_", " "))
    if fmt == "github" and status in (FAIL, ERROR):
        label = f"**{label}**"
    metric = worst_metric(record)
    what = f"{record['check']} {metric} {beside_threshold(record['metrics'], record['threshold'], metric)}" \
        if metric else (record["check"] if record["check"] != stages.STAGE_RUN else "")
    return f"{label} {what}".strip()


def pair_status(records: list[dict[str, Any]]) -> str:
    return min((r["status"] for r in records), key=SEVERITY.get, default=PASS)


def by_pair(document: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Records by pair, the worst pairs first (the run's order within a status)."""
    groups: dict[str, list] = {}
    for r in document["results"]:
        groups.setdefault(r["model"], []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: SEVERITY[pair_status(kv[1])]))


def stage_columns(results: list[dict[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(r["stage"] for r in results))
    return [s for s in stages.FLOAT_STAGES if s in seen] + [s for s in seen if s not in stages.FLOAT_STAGES]


def render_matrix(document: dict[str, Any], fmt: str = "github") -> str:
    """Pairs by stages, each cell the stage's worst status and measurement."""
    columns = stage_columns(document["results"])
    rows = []
    for model, records in by_pair(document).items():
        failing = pair_status(records) in (FAIL, ERROR)
        name = f"**{model}**" if failing and fmt == "github" else model
        rows.append([name] + [matrix_cell([r for r in records if r["stage"] == s], fmt) for s in columns])
    if fmt != "github":
        return tabulate(rows, headers=["pair", *columns], tablefmt=fmt)
    return "\n".join(["| pair | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
                     + ["| " + " | ".join(table_cell(c) for c in row) + " |" for row in rows])


def divergence_line(record: dict[str, Any]) -> str:
    """A divergence record in one line: where a failing stage first departs from its parent."""
    m = record["metrics"]
    if "ranking" in m:  # a quantized stage: where its cost comes from (harness/quant_rank.py)
        return (f"quantization cost: {record['stage']}, mean KL {_fmt(m['mean_kl'])} against tflite_float, mostly "
                f"{m['label']} ({_fmt(m['ranking'].get(m['point'], 0.0))} quantized alone)")
    if m.get("point") is None:
        return f"nothing diverges: {record['stage']} within {_fmt(m['tolerance'])} at every matched point"
    return (f"first divergence: {record['stage']}, {m['label']}, position {m['position']} "
            f"({_fmt(m['error'])}, tolerance {_fmt(m['tolerance'])})")


def divergences(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The divergence record of each (pair, stage) that has one."""
    return {(r["model"], r["stage"]): r for r in results if r["check"] == stages.DIVERGENCE}


def failure_lines(record: dict[str, Any], fmt: str = "github", divergence: dict[str, Any] | None = None) -> list[str]:
    """A failed or errored record as the summary lists it, with where its stage began to diverge."""
    model = f"**{record['model']}**" if fmt == "github" else record["model"]
    lines = [f"- {model} {record['stage']} {record['check']} ({record['status'].upper()}): "
             f"{table_cell(record['message'], 'plain') or 'no message'}"]
    return lines + ([f"  - {divergence_line(divergence)}"] if divergence else [])


def shown_metrics(record: dict[str, Any]) -> list[str]:
    """The gated metrics of a record, then the headline ones it measured without a gate."""
    gated = [m for m in record["metrics"] if f"max_{m}" in record["threshold"] or f"min_{m}" in record["threshold"]]
    return gated + [m for m in HEADLINE_METRICS if m in record["metrics"] and m not in gated]


def model_table(results: list[dict[str, Any]], fmt: str = "github") -> str:
    """One row per stage x check: every gated value with its threshold beside it, and the message whole."""
    headers = ["stage", "check", "status", "measured (gate)", "message"]
    rows = []
    for r in results:
        rows.append([r["stage"], r["check"], r["status"].upper() if r["status"] != PASS else "pass",
                     ", ".join(f"{m} {beside_threshold(r['metrics'], r['threshold'], m)}" for m in shown_metrics(r)),
                     r["message"]])
    if fmt != "github":
        return tabulate([[table_cell(c, fmt) for c in row] for row in rows], headers=headers, tablefmt=fmt)
    return "\n".join(["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
                     + ["| " + " | ".join(table_cell(c) for c in row) + " |" for row in rows])


def _pair_details(model: str, records: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """A pair's full table, declared defects, timings and notes, folded."""
    timings = info.get("timings", {})
    seconds = f", {sum(timings.values()):.1f} s" if timings else ""
    lines = [f"<details><summary>{model}: {pair_status(records).upper()} ({counts(records)}{seconds})</summary>", ""]
    lines += [line for r in divergences(records).values() for line in (divergence_line(r), "")]
    if info.get("description"):
        lines += [info["description"], ""]
    # An xfail's message carries its defect's reason, said once below the table: the row keeps the measurement.
    reasons = {d["name"]: d["reason"] for d in info.get("expected_failures", [])}
    lines += [model_table([{**r, "message": r["message"].replace(reasons[r["defect"]], "reason below")}
                           if r.get("defect") in reasons else r for r in records]), ""]
    # One defect declared at several stages (the engine's, at every bundle stage) is said once, with its stages.
    declared: dict[tuple, list[str]] = {}
    for defect in info.get("expected_failures", []):
        band = ", ".join(f"{m} in [{lo:.3g}, {hi:.3g}]" for m, (lo, hi) in defect["band"].items())
        what = (defect["name"], defect["check"], band, defect["reason"], defect.get("reproduction") or "")
        declared.setdefault(what, []).append(defect["stage"])
    for (name, check, band, reason, reproduction), at in declared.items():
        lines += [f"Declared upstream defect {name} at {', '.join(at)} {check} (excused only within {band}): "
                  f"{reason}", ""]
        if reproduction:
            lines += ["Minimal reproduction:", "", "```python", reproduction.strip(), "```", ""]
    if timings:
        lines += ["Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    for key, value in info.get("notes", {}).items():
        if key == "artifacts":  # sha256 prefixes: enough to tell two runs' artifacts apart
            value = ", ".join(f"{name} {_short_digest(entry['sha256'])}" for name, entry in value.items())
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"- {key}: {value}")
    return lines + ["", "</details>", ""]


def _short_digest(digest) -> str:
    if isinstance(digest, dict):  # every file of an entry (a checkpoint): its weights
        digest = next((d for name, d in digest.items() if name.endswith(".safetensors")), None)
    return (digest or "?")[:12]


def run_lines(document: dict[str, Any]) -> list[str]:
    """What the run was: gates, code, libraries, and what it left out (stopped, unchanged pairs, shards)."""
    run = document["run"]
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items())
    commit = (run.get("harness") or {}).get("commit")
    lines = [f"Gates `{run.get('gates', '')}`" + (f", harness {commit[:12]}" if commit else "")
             + f". Versions: {versions}.", ""]
    if run.get("stopped"):
        lines += [f"**{run['stopped']}**", ""]
    changed = run.get("changed_since")
    if changed:
        skipped = changed["skipped"]
        lines += [f"Changed since `{changed['base']}`: ran {len(changed['affected'])} touched pair(s); "
                  + (f"skipped {', '.join(skipped)} (untouched by the change)." if skipped else "none skipped."), ""]
        for name, why in (changed.get("not_in_suite") or {}).items():
            lines += [f"**Not verified by this run: {name}**, touched by {'; '.join(why)}; this run's suite does not "
                      f"hold it (`{verify_command(name)}`; CI's nightly full run does).", ""]
    if run.get("shards"):
        lines += [f"Merged from {len(run['shards'])} shards: " + "; ".join(
            f"{s.get('shard') or '?'} ran {', '.join(s['models']) or 'no pair'}" for s in run["shards"]) + ".", ""]
    elif run.get("shard"):
        lines += [f"Shard {run['shard']} of the selection {', '.join(run.get('shard_of', []))}.", ""]
    return lines


def render_summary(document: dict[str, Any], fmt: str = "github", budget: int = SUMMARY_BUDGET) -> str:
    """The verdict, the matrix, the failures, then (Markdown only) each pair's folded table while they fit
    in `budget` characters; the console (fmt "simple") gets the first three."""
    groups = by_pair(document)
    lines = [f"# edge-parity: {overall(document).upper()} ({counts(document['results']) or 'no checks ran'})", ""]
    lines += run_lines(document)
    if groups:
        lines += [render_matrix(document, fmt), ""]
    failures = [r for r in document["results"] if r["status"] in (FAIL, ERROR)]
    if failures:
        lines += ["## Failures", ""]
        where, told = divergences(document["results"]), set()
        for r in failures:  # the divergence of a stage once, under its first failure
            key = (r["model"], r["stage"])
            lines += failure_lines(r, fmt, where.get(key) if key not in told else None)
            told.add(key)
        lines += [""]
    if fmt != "github":
        return "\n".join(lines).rstrip() + "\n"
    head = "\n".join(lines)
    blocks = {m: "\n".join(_pair_details(m, records, document["models"].get(m, {}))) for m, records in groups.items()}
    kept, left = [], []
    size = len(head)
    for model, block in blocks.items():
        if not left and size + len(block) + 400 <= budget:
            kept.append(block)
            size += len(block) + 1
        else:
            left.append(model)
    tail = [f"Tables of {', '.join(left)} left out to fit a PR comment: every record is in parity.json "
            "(the reports artifact of this run)."] if left else []
    return "\n".join([head, "## Pairs", "", *kept, *tail]).rstrip() + "\n"
