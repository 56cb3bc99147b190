"""The bench's public face (harness.bench): the gates it reads, the command line, and a child kept light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import bench, cli
from harness.bench import run
from harness.records import FAIL, PASS


def test_gates_hold_the_bench_budget(gates):
    for metric in bench.GATED_METRICS:
        assert 0 < gates.thresholds("tiny_llama", bench.BENCH, metric)["max_slowdown"] < 1


def test_measurement_child_imports_only_the_worker():
    """A measurement child must not carry the parent's machinery (torch) in the memory it measures."""
    probe = ("import sys, harness.bench.worker; "
             "print(sorted(m for m in ('torch', 'harness.bench.run', 'harness.bench.report') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the command line ----------------------------------------------------------------------------

def _decision(status):
    return {"model": "tiny_llama", "stage": "tflite_float", "recipe": "none", "threads": 1, "metric": "m",
            "ratio": 0.8, "low": 0.7, "high": 0.9, "max_slowdown": 0.05, "rounds": 3, "status": status}


@pytest.mark.parametrize("status,code", [(PASS, cli.EXIT_PASS), (FAIL, cli.EXIT_GATE_FAILED)])
def test_cli_exit_code_follows_the_gate(monkeypatch, tmp_path, status, code):
    monkeypatch.setattr(bench, "run_bench",
                        lambda *a, **k: run.perf_document({"host": {}}, None, [_decision(status)], None))
    assert cli.main(["bench", "--models", "tiny_llama", "--baseline", str(tmp_path), "--out", str(tmp_path)]) == code


def test_cli_missing_baseline_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["bench", "--models", "tiny_llama", "--baseline", str(tmp_path / "none"), "--gate-only",
                     "--out", str(tmp_path)])
    assert code == cli.EXIT_USAGE and "--save-baseline" in capsys.readouterr().err


def test_cli_rejects_bad_thread_counts(capsys):
    assert cli.main(["bench", "--threads", "0,2"]) == cli.EXIT_USAGE
    assert "--threads 0,2: give positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a number at all: argparse's usage error
        cli.main(["bench", "--threads", "two"])
