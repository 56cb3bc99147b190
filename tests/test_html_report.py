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


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """A cache of this file's plots: the first page draws every plot, the next ones only those of moved records."""
    from harness.cache import ArtifactCache

    return ArtifactCache(tmp_path_factory.mktemp("figures"))


def test_the_page_is_self_contained_and_leads_with_the_failure(figures):
    page = html_report.render_html(planted(), figures=figures)
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


def test_error_along_positions_and_kl_distributions_are_drawn_when_recorded(figures):
    """A stage's per-position error and a quantized stage's KL percentiles each add their plot to the pair."""
    doc = planted()
    qwen3 = [r for r in doc["results"] if r["model"] == "qwen3"]
    for r in qwen3:
        if r["check"] == "logits":
            r["metrics"]["per_position_max_abs_err"] = [[1e-6] * 5 + [0.3] * 5, [1e-6] * 8]
            r["metrics"]["worst_prompt"] = 0
        if r["check"] == "quant_accuracy":
            r["metrics"]["kl_percentiles"] = {"0": 1e-7, "50": 1e-4, "99": 3e-3, "100": 1e-2}
    page = html_report.render_html(doc, figures=figures)
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


def test_chromium_renders_it_without_console_errors(tmp_path, figures):
    """A screenshot from headless Chromium, as a reviewer's browser would show the page."""
    chromium = browser()
    page = tmp_path / "report.html"
    page.write_text(html_report.render_html(planted(), figures=figures))
    shot = tmp_path / "shot.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perf_figures_join_the_page_when_bench_wrote_beside_it(tmp_path, figures):
    from harness import report

    perf = json.loads((ROOT / "reports" / "sample" / "perf.json").read_text())
    (tmp_path / "perf.json").write_text(json.dumps(perf))
    report.write_reports(tmp_path, SAMPLE, final=True, figures=figures)
    page = (tmp_path / "report.html").read_text()
    perf_part = page[page.index("<section id=\"perf\">"):]
    assert "tiny_llama" in perf_part and perf_part.count("data:image/png;base64,") == 1
    assert "/root/" not in page and str(Path.home()) not in page  # paths scrubbed as in every report


def test_a_plot_is_drawn_once_for_its_records_and_again_when_they_move(tmp_path):
    """The cache gives the page drawn afresh, byte for byte; a pair whose records moved is drawn again, alone; a
    cache that cannot be written still gives the page."""
    from harness.cache import ArtifactCache

    two = {"gemma3", "qwen3"}
    doc = copy.deepcopy(SAMPLE)
    doc["models"] = {m: info for m, info in doc["models"].items() if m in two}
    doc["results"] = [r for r in doc["results"] if r["model"] in two]
    drawn = html_report.render_html(doc)
    cache = ArtifactCache(tmp_path / "cache")
    assert html_report.render_html(doc, figures=cache) == drawn and len(cache.misses) == 6 and not cache.hits
    assert html_report.render_html(doc, figures=cache) == drawn and len(cache.hits) == 6
    record = next(r for r in doc["results"] if (r["model"], r["check"]) == ("qwen3", "logits"))
    record["metrics"]["max_abs_err"] *= 1000
    moved = html_report.render_html(doc, figures=cache)
    assert moved == html_report.render_html(doc) != drawn
    assert len(cache.misses) == 6 + 3 and len(cache.hits) == 6 + 3  # qwen3 drawn again, gemma3 served
    # /sys refuses every write, even root's (as a read-only file system does)
    assert html_report.render_html(doc, figures=ArtifactCache(Path("/sys/edge-parity"))) == moved
