"""report.html: one self-contained page rendered from parity.json and perf.json (no network at view time, no script).

The matrix as summary.md has it, then a section per pair: a plot of every gated check's distance to its
gate (1 is the gate; a bar past it failed), so where along the stages a pair starts to drift is visible at
a glance; the logit error along the positions per stage (where it departs); the quantized stages' KL
distributions; and the pair's full table. Plots are PNGs embedded as data URIs.

A plot is a function of its pair's records and the code that draws it, and drawing one takes ~0.3 s (10 s of a
ten-pair page, a seventh of a warm default verify), so a run with the shared cache keeps each plot there, keyed
by those records, this module's plotting code and matplotlib's version: a pair whose records did not move is not
drawn again.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from typing import Any

from harness import stages, summary
from harness.records import ERROR, FAIL, NOT_RUN, PASS, XFAIL

REPORT_HTML = "report.html"
FIGURES_KIND = "figures"  # the cache's kind for plots
FIGURE_FILE = "figure.png"  # an entry's plot; empty when the records give none
COLOURS = {PASS: "#3a7d44", FAIL: "#c0392b", ERROR: "#8e44ad", XFAIL: "#d68910", NOT_RUN: "#7f8c8d"}
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.fail,.error{background:#fde2e0;font-weight:bold}.xfail{background:#fdf2dc}
.not_run,.skip{background:#eee}h1.fail{color:#c0392b;background:none}h1.pass{color:#3a7d44}
img{max-width:100%}section{border-top:2px solid #ddd;margin-top:2em}"""


def gate_distances(records: list[dict[str, Any]]) -> list[tuple[str, float, str]]:
    """(stage.check, distance to the gate of its nearest metric, status) for every gated record."""
    out = []
    for r in records:
        metric = summary.worst_metric(r)
        if metric is not None:
            out.append((f"{r['stage']}.{r['check']}", summary.closeness(r["metrics"][metric], r["threshold"], metric),
                        r["status"]))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a base64 PNG, closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def plot_distances(model: str, records: list[dict[str, Any]]) -> str | None:
    """A PNG (base64) of each check's distance to its gate, on a log scale, the gate drawn at 1."""
    rows = [(name, d, status) for name, d, status in gate_distances(records) if d > 0]
    if not rows:
        return None
    fig, ax = _pyplot().subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    shown = [min(max(d, 1e-9), 1e3) for _, d, _ in rows]  # a failure past any scale is drawn at the edge
    ax.barh(range(len(rows)), shown, color=[COLOURS.get(s, "#555") for _, _, s in rows])
    ax.axvline(1.0, color="#c0392b", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="measured / gate (nearest metric; 1 = at the gate)", title=f"{model}: distance to each gate")
    return _png(fig)


def plot_positions(model: str, records: list[dict[str, Any]]) -> str | None:
    """Per stage, the worst logit error at each position of its worst prompt, against the stage it came from:
    a stage that departs at some position shows as a step there; its gate is the dashed line."""
    curves = [r for r in records if r["check"] == stages.LOGITS and r["metrics"].get("per_position_max_abs_err")]
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=(8, 3.2))
    for r in curves:
        m = r["metrics"]
        errors = m["per_position_max_abs_err"][m.get("worst_prompt", 0)]
        line, = ax.plot(range(len(errors)), [max(e, 1e-9) for e in errors], marker=".", linewidth=1,
                        label=f"{r['stage']} (prompt {m.get('worst_prompt', 0)})")
        if "max_max_abs_err" in r["threshold"]:
            ax.axhline(r["threshold"]["max_max_abs_err"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set(xlabel="position", ylabel="max |logit error| vs parent", title=f"{model}: error along the positions")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_kl(model: str, records: list[dict[str, Any]]) -> str | None:
    """Per quantized stage, the distribution of KL to the float flatbuffer over positions (percentile curve)."""
    curves = [r for r in records if r["check"] == stages.QUANT_ACCURACY and r["metrics"].get("kl_percentiles")]
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=(8, 3.2))
    for r in curves:
        percentiles = r["metrics"]["kl_percentiles"]
        ax.plot([max(v, 1e-12) for v in percentiles.values()], [float(q) for q in percentiles], marker=".",
                label=r["stage"])
    ax.set_xscale("log")
    ax.set(xlabel="KL(float || quantized) at a position", ylabel="percentile of positions",
           title=f"{model}: quantized KL distribution")
    ax.legend(fontsize=7)
    return _png(fig)


@functools.cache
def _drawing(plot) -> dict[str, Any]:
    """What draws `plot`'s figures, for their keys: its code (describe skips modules, so summary's helpers are
    named) and matplotlib's version. Once per plot, not once per figure."""
    from importlib.metadata import version

    from harness.pairs import describe

    return {"plot": describe([plot, _png, _pyplot, summary.worst_metric, summary.closeness]),
            "matplotlib": version("matplotlib")}


def figure(plot, model: str, records: list[dict[str, Any]], cache=None) -> str | None:
    """`plot(model, records)`, from the cache when it holds this plot of these records (drawn into it on a miss).
    A cache that cannot be written (read-only, full) only costs the drawing."""
    if cache is None:
        return plot(model, records)
    key = {**_drawing(plot), "model": model, "records": records}

    def draw(out):
        png = plot(model, records)
        (out / FIGURE_FILE).write_bytes(base64.b64decode(png) if png else b"")

    try:
        png = (cache.get_or_build(FIGURES_KIND, key, draw) / FIGURE_FILE).read_bytes()
    except OSError:
        return plot(model, records)
    return base64.b64encode(png).decode() if png else None


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr class=\"{(classes or [''] * len(rows))[i]}\">"
                   + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def perf_section(perf: dict[str, Any]) -> str:
    """perf.json of `harness bench` (when it wrote to the same directory): its table and its plot."""
    from harness.bench.report import measurement_table, plot_perf

    buffer = io.BytesIO()
    plot_perf(perf, buffer)
    png = base64.b64encode(buffer.getvalue()).decode()
    return (f"<section id=\"perf\"><h2>Performance (XNNPack): {html.escape(str(perf.get('verdict', '')))}</h2>"
            + measurement_table(perf, fmt="html")
            + f"<img alt=\"prefill latency and decode throughput\" src=\"data:image/png;base64,{png}\"></section>")


def render_html(document: dict[str, Any], perf: dict[str, Any] | None = None, figures=None) -> str:
    """The page; `perf` (perf.json) adds the performance figures; `figures`, a shared ArtifactCache, keeps the plots."""
    verdict = summary.overall(document)
    groups = summary.by_pair(document)
    columns = summary.stage_columns(document["results"])
    matrix_rows, matrix_classes = [], []
    for model, records in groups.items():
        matrix_rows.append([model] + [summary.matrix_cell([r for r in records if r["stage"] == s], "plain")
                                      for s in columns])
        matrix_classes.append(summary.pair_status(records))
    parts = [f"<h1 class=\"{verdict}\">edge-parity: {verdict.upper()}</h1>",
             f"<p>{html.escape(summary.counts(document['results']))}</p>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in summary.run_lines(document) if line]
    parts.append(_table(["pair", *columns], matrix_rows, matrix_classes))
    failures = [r for r in document["results"] if r["status"] in (FAIL, ERROR)]
    if failures:
        parts.append("<h2>Failures</h2><ul>" + "".join(
            f"<li><b>{html.escape(r['model'])}</b> {r['stage']} {r['check']}: {html.escape(r['message'])}</li>"
            for r in failures) + "</ul>")
    for model, records in groups.items():
        info = document["models"].get(model, {})
        parts.append(f"<section id=\"{html.escape(model)}\"><h2>{html.escape(model)}: "
                     f"{summary.pair_status(records).upper()}</h2><p>{html.escape(info.get('description', ''))}</p>")
        for title, plot in (("distance to each gate", plot_distances), ("error along the positions", plot_positions),
                            ("quantized KL distribution", plot_kl)):
            png = figure(plot, model, records, figures)
            if png:
                parts.append(f"<img alt=\"{html.escape(model)}: {title}\" src=\"data:image/png;base64,{png}\">")
        rows = [[r["stage"], r["check"], r["status"], ", ".join(
            f"{m} {summary.beside_threshold(r['metrics'], r['threshold'], m)}" for m in summary.shown_metrics(r)),
            r["message"]] for r in records]
        parts.append(_table(["stage", "check", "status", "measured (gate)", "message"], rows,
                            [r["status"] for r in records]) + "</section>")
    if perf and perf.get("measurements"):
        parts.append(perf_section(perf))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>edge-parity: "
            f"{verdict.upper()}</title><style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
