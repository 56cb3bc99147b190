"""report.html: self-contained, rendered from parity.json, and it renders in a real headless browser."""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import html_report

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = json.loads((ROOT / "reports" / "sample" / "parity.json").read_text())


def planted():
    doc = copy.deepcopy(SAMPLE)
    record = next(r for r in doc["results"] if (r["model"], r["stage"], r["check"]) == ("qwen3", "stablehlo", "logits"))
    record.update(status="fail", message="max_abs_err=0.31 > 0.0001 <worst at prompt 2>")
    record["metrics"]["max_abs_err"] = 0.31
    return doc


def test_the_page_is_self_contained_and_leads_with_the_failure():
    page = html_report.render_html(planted())
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "nothing fetched at view time"
    assert "<script" not in page
    assert page.count(": distance to each gate\" src=\"data:image/png;base64,") == len(SAMPLE["models"])
    assert "<h1 class=\"fail\">edge-parity: FAIL</h1>" in page
    matrix = page[page.index("<table>"):page.index("</table>")]
    first_row = matrix.split("<tr class=")[1]
    assert first_row.startswith("\"fail\"><td>qwen3</td>") and "FAIL logits max_abs_err 0.31 (≤0.0001)" in first_row
    assert "max_abs_err=0.31 &gt; 0.0001 &lt;worst at prompt 2&gt;" in page  # messages escaped, whole
    for model in SAMPLE["models"]:
        assert f"<section id=\"{model}\">" in page


def test_error_along_positions_and_kl_distributions_are_drawn_when_recorded():
    """A stage's per-position error and a quantized stage's KL percentiles each add their plot to the pair."""
    doc = planted()
    qwen3 = [r for r in doc["results"] if r["model"] == "qwen3"]
    for r in qwen3:
        if r["check"] == "logits":
            r["metrics"]["per_position_max_abs_err"] = [[1e-6] * 5 + [0.3] * 5, [1e-6] * 8]
            r["metrics"]["worst_prompt"] = 0
        if r["check"] == "quant_accuracy":
            r["metrics"]["kl_percentiles"] = {"0": 1e-7, "50": 1e-4, "99": 3e-3, "100": 1e-2}
    page = html_report.render_html(doc)
    section = page.split("<section id=\"qwen3\">")[1].split("</section>")[0]
    assert "qwen3: error along the positions" in section and "qwen3: quantized KL distribution" in section
    assert section.count("data:image/png;base64,") == 3


def test_distance_to_the_gate_is_above_1_only_past_it():
    distances = dict((name, d) for name, d, _ in html_report.gate_distances(
        [r for r in planted()["results"] if r["model"] == "qwen3"]))
    assert distances["stablehlo.logits"] > 1 and distances["reauthored.logits"] < 1


def browser():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (apt-get install chromium): the browser test is opt-in")
    return found


def test_chromium_renders_it_without_console_errors(tmp_path):
    """A screenshot from headless Chromium, as a reviewer's browser would show the page."""
    chromium = browser()
    page = tmp_path / "report.html"
    page.write_text(html_report.render_html(planted()))
    shot = tmp_path / "shot.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perf_figures_join_the_page_when_bench_wrote_beside_it(tmp_path):
    from harness import report

    perf = json.loads((ROOT / "reports" / "sample" / "perf.json").read_text())
    (tmp_path / "perf.json").write_text(json.dumps(perf))
    report.write_reports(tmp_path, SAMPLE, final=True)
    page = (tmp_path / "report.html").read_text()
    perf_part = page[page.index("<section id=\"perf\">"):]
    assert "tiny_llama" in perf_part and perf_part.count("data:image/png;base64,") == 1
    assert "/root/" not in page and str(Path.home()) not in page  # paths scrubbed as in every report
