"""The gates file: every tolerance and budget, with per-model overrides."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from harness.errors import GatesError
from harness.stages import TFLITE_FLOAT, TFLITE_PREFIX

DEFAULT_GATES_PATH = Path(__file__).with_name("gates.toml")
QUANTIZED_FALLBACK = "tflite_quantized"

Gates = dict[str, Any]


def load_gates(path: Path | None = None) -> Gates:
    """Reads and validates a gates file, so a typo fails before any conversion."""
    path = Path(path) if path else DEFAULT_GATES_PATH
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise GatesError(f"gates file {path} does not exist; pass --gates with an existing TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise GatesError(f"gates file {path} is not valid TOML: {e}; fix the line it names") from None
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise GatesError(f"gates file {path} has unknown top-level tables {sorted(unknown)}; use [defaults] and [models]")
    for where, stages in [("defaults", data.get("defaults", {}))] + [
        (f"models.{m}", s) for m, s in data.get("models", {}).items()
    ]:
        for stage, checks in stages.items():
            for check, thresholds in checks.items():
                if not isinstance(thresholds, dict):
                    raise GatesError(f"gates file {path}: [{where}.{stage}.{check}] must be a table of thresholds")
                for key, value in thresholds.items():
                    if not key.startswith(("max_", "min_")):
                        raise GatesError(
                            f"gates file {path}: {where}.{stage}.{check}.{key} must start with max_ or min_"
                        )
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                        raise GatesError(f"gates file {path}: {where}.{stage}.{check}.{key} = {value!r} is not a number")
    data["_path"] = str(path)
    return data


def thresholds_for(gates: Gates, model: str, stage: str, check: str) -> dict[str, float]:
    """Defaults for the stage (or the quantized fallback), overridden by the model's own table."""
    defaults = gates.get("defaults", {})
    stage_defaults = defaults.get(stage)
    if stage_defaults is None and stage.startswith(TFLITE_PREFIX) and stage != TFLITE_FLOAT:
        stage_defaults = defaults.get(QUANTIZED_FALLBACK, {})
    merged = dict((stage_defaults or {}).get(check, {}))
    merged.update(gates.get("models", {}).get(model, {}).get(stage, {}).get(check, {}))
    return merged


def judge(metrics: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """The threshold violations, as readable sentences; empty means pass."""
    failures = []
    for key, limit in sorted(thresholds.items()):
        name = key[4:]
        if name not in metrics:
            failures.append(f"metric {name} was not measured but the gates require {key}")
            continue
        value = metrics[name]
        bad = (value is None or (isinstance(value, float) and math.isnan(value))
               or (key.startswith("max_") and value > limit)
               or (key.startswith("min_") and value < limit))
        if bad:
            failures.append(f"{name}={_fmt(value)} {'>' if key.startswith('max_') else '<'} {_fmt(limit)}")
    return failures


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
