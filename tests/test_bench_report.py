"""perf.md and perf.png (harness.bench.report) are rendered from perf.json alone."""

from __future__ import annotations

import json

from harness.bench import report


def test_perf_md_and_plot_rendered_from_json(perf):
    out, _ = perf
    document = json.loads((out / report.PERF_JSON).read_text())
    assert (out / report.PERF_MD).read_text() == report.render_perf(document, report.PERF_PNG)
    text = (out / report.PERF_MD).read_text()
    assert "XNNPack delegation" in text and "decode tok/s" in text
    assert (out / report.PERF_PNG).read_bytes()[:4] == b"\x89PNG"
