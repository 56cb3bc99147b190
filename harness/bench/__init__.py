"""XNNPack performance of converted artifacts, and the performance gate against a baseline.

The entry points the CLI and tests use. They load on first use, because every measurement
child imports harness.bench.worker, and the parent's machinery (torch among it) would sit in
the very process whose memory and start-up the worker measures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.bench.report import PERF_JSON, PERF_MD, PERF_PNG, render_perf
    from harness.bench.run import (BENCH, GATED_METRICS, Artifact, BenchSettings, resolve_artifacts, run_bench,
                                   run_self_check)

# name -> the module of this package that defines it
_EXPORTS = {
    "Artifact": "run", "BenchSettings": "run", "BENCH": "run", "GATED_METRICS": "run",
    "resolve_artifacts": "run", "run_bench": "run", "run_self_check": "run",
    "PERF_JSON": "report", "PERF_MD": "report", "PERF_PNG": "report", "render_perf": "report",
}
__all__ = ["Artifact", "BenchSettings", "BENCH", "GATED_METRICS", "resolve_artifacts", "run_bench",
           "run_self_check", "PERF_JSON", "PERF_MD", "PERF_PNG", "render_perf"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups (and monkeypatch) see a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
