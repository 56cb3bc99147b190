"""Plain records that stages and checks produce and reports serialise."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
from typing import Any

PASS, FAIL, ERROR, SKIP, XFAIL = "pass", "fail", "error", "skip", "xfail"
STATUSES = (PASS, FAIL, ERROR, SKIP, XFAIL)


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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRACKED_PACKAGES = (
    "torch", "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "litert-converter",
    "tensorflow-cpu", "tensorflow", "transformers", "numpy", "hypothesis",
)


def library_versions() -> dict[str, str]:
    """Exact versions of every library in the conversion chain."""
    versions = {}
    for name in TRACKED_PACKAGES:
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


def host_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }


def run_metadata(**extra: Any) -> dict[str, Any]:
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "host": host_info(),
        **extra,
    }
