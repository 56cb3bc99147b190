"""Plain records that stages and checks produce and reports serialise."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
from typing import Any

PASS, FAIL, ERROR, SKIP, XFAIL, INFO, NOT_RUN = "pass", "fail", "error", "skip", "xfail", "info", "not_run"
# info: a measurement reported without a gate (never counted as a pass); xfail: a failure inside the band
# of a declared upstream defect (harness/gates.py Gate.judge); not_run: a stage or pair the run asked for
# and never reached (it was interrupted, or is still going): a report holding one never reads as PASS.
STATUSES = (PASS, FAIL, ERROR, SKIP, XFAIL, INFO, NOT_RUN)

# A run's own status (parity.json run.status): running while pairs remain, then complete or interrupted.
RUNNING, COMPLETE, INTERRUPTED = "running", "complete", "interrupted"


@dataclasses.dataclass
class CheckResult:
    """One model x stage x check verdict, with what was measured and what it was held to."""

    model: str
    stage: str
    check: str
    status: str
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    threshold: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""
    defect: str | None = None  # the declared upstream defect (its name) whose band this check is held to

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRACKED_PACKAGES = (
    "torch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "litert-converter",
    "tensorflow-cpu", "tensorflow", "transformers", "numpy", "hypothesis",
)


def library_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Exact versions of every library in the conversion chain (of `names`), as installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The instruction-set extensions that decide which XNNPack kernels run (and so a quantized stage's exact
# numbers): a golden recorded on one set may differ in its last quantization steps on another.
ISA_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """Every flag this CPU reports (x86-64 Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def isa_features() -> list[str]:
    """Which of ISA_FEATURES this CPU reports (x86-64 Linux; empty elsewhere)."""
    flags = set(cpu_flags())
    return [name for name in ISA_FEATURES if name in flags]


def host_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "isa": isa_features(),
        "cores": os.cpu_count(),
    }


def run_metadata(**extra: Any) -> dict[str, Any]:
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "host": host_info(),
        **extra,
    }
