"""The gates file: every tolerance and budget, with per-model overrides, validated by name on load.

A gate fails closed: an unknown stage, check, metric or model in the file is an error naming the
nearest valid name (a misspelt table would otherwise leave a check with no thresholds), and a
gated record judged against no threshold is an error, not a pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from pathlib import Path
from typing import Any, Iterable

from harness import stages
from harness.errors import GatesError
from harness.paths import display_path
from harness.records import ERROR, FAIL, INFO, PASS, XFAIL

DEFAULT_GATES_PATH = Path(__file__).with_name("gates.toml")
QUANTIZED_FALLBACK = stages.QUANTIZED_FALLBACK

Thresholds = dict[str, float]


def _nearest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(sorted(valid))}"


@dataclasses.dataclass(frozen=True)
class Gates:
    """A validated gates file: [defaults.<stage>.<check>] and [models.<pair>.<stage>.<check>] tables."""

    path: str  # as reports show it: relative to the project, or under ~
    defaults: dict[str, dict[str, Thresholds]]
    models: dict[str, dict[str, dict[str, Thresholds]]]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<gates>") -> Gates:
        """Validates every name and value of a parsed gates file."""
        unknown = set(data) - {"defaults", "models"}
        if unknown:
            raise GatesError(f"gates file {where} has unknown top-level tables {sorted(unknown)}; "
                             "use [defaults] and [models]")
        defaults = data.get("defaults", {})
        models = data.get("models", {})
        _validate_stages(defaults, where, "defaults")
        for model, table in models.items():
            _validate_stages(table, where, f"models.{model}")
        return cls(where, defaults, models)

    def thresholds(self, model: str, stage: str, check: str) -> Thresholds:
        """Defaults for the stage (or the quantized fallback), overridden by the model's own table."""
        merged = dict(self._stage_defaults(stage).get(check, {}))
        merged.update(self.models.get(model, {}).get(stage, {}).get(check, {}))
        return merged

    def stage_table(self, model: str, stage: str) -> dict[str, Thresholds]:
        """Every check's thresholds for a stage, whether or not that check ran this time."""
        checks = set(self._stage_defaults(stage)) | set(self.models.get(model, {}).get(stage, {}))
        return {c: dict(sorted(self.thresholds(model, stage, c).items())) for c in sorted(checks)}

    def require_models(self, known: Iterable[str]) -> None:
        """Model overrides must name a known pair: a misspelt one would be silently ignored."""
        known = set(known)
        for model in self.models:
            if model not in known:
                raise GatesError(f"gates file {self.path}: [models.{model}] names no known model pair "
                                 f"({_nearest(model, known)}); fix the name or remove the table")

    def _stage_defaults(self, stage: str) -> dict[str, Thresholds]:
        table = self.defaults.get(stage)
        if table is None and stages.is_quantized(stage):
            table = self.defaults.get(QUANTIZED_FALLBACK)
        if table is None and stage.startswith(stages.LITERTLM_PREFIX):  # a quantized bundle: the float one's gates
            table = self.defaults.get(stages.LITERTLM)
        return table or {}


def _validate_stages(table: dict[str, Any], where: str, prefix: str) -> None:
    for stage, checks in table.items():
        if stage not in stages.CHECKS_AT:
            raise GatesError(f"gates file {where}: [{prefix}.{stage}] is not a stage ({_nearest(stage, stages.CHECKS_AT)})")
        if not isinstance(checks, dict):
            raise GatesError(f"gates file {where}: [{prefix}.{stage}] must be a table of checks")
        for check, thresholds in checks.items():
            name = f"{prefix}.{stage}.{check}"
            if check not in stages.CHECKS_AT[stage]:
                raise GatesError(f"gates file {where}: [{name}] is not a check of stage {stage} "
                                 f"({_nearest(check, stages.CHECKS_AT[stage])})")
            if not isinstance(thresholds, dict):
                raise GatesError(f"gates file {where}: [{name}] must be a table of thresholds")
            metrics = stages.GATED_METRICS[check]
            for key, value in thresholds.items():
                if not key.startswith(("max_", "min_")):
                    raise GatesError(f"gates file {where}: {name}.{key} must start with max_ or min_")
                if key[4:] not in metrics:
                    valid = [f"{key[:3]}_{m}" for m in metrics]  # the bound it was written with
                    raise GatesError(f"gates file {where}: {name}.{key}: {check} measures no metric {key[4:]!r} "
                                     f"({_nearest(key, valid)})")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise GatesError(f"gates file {where}: {name}.{key} = {value!r} is not a number")


def load_gates(path: Path | None = None) -> Gates:
    """Reads and validates a gates file, so a typo fails before any conversion."""
    path = Path(path) if path else DEFAULT_GATES_PATH
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise GatesError(f"gates file {path} does not exist; pass --gates with an existing TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise GatesError(f"gates file {path} is not valid TOML: {e}; fix the line it names") from None
    return Gates.from_dict(data, display_path(path))


@dataclasses.dataclass(frozen=True)
class Violation:
    metric: str
    value: Any
    limit: float
    bound: str  # "max" or "min"
    measured: bool = True

    def __str__(self) -> str:
        if not self.measured:
            return f"metric {self.metric} was not measured but the gates require {self.bound}_{self.metric}"
        return f"{self.metric}={_fmt(self.value)} {'>' if self.bound == 'max' else '<'} {_fmt(self.limit)}"


def violations(metrics: dict[str, Any], thresholds: Thresholds) -> list[Violation]:
    """The threshold violations; empty means every threshold holds. A metric not measured, or NaN, violates."""
    found = []
    for key, limit in sorted(thresholds.items()):
        bound, name = key[:3], key[4:]
        if name not in metrics:
            found.append(Violation(name, None, limit, bound, measured=False))
            continue
        value = metrics[name]
        bad = (value is None or (isinstance(value, float) and math.isnan(value))
               or (bound == "max" and value > limit) or (bound == "min" and value < limit))
        if bad:
            found.append(Violation(name, value, limit, bound))
    return found


def judge(metrics: dict[str, Any], thresholds: Thresholds) -> list[str]:
    """The threshold violations, as readable sentences; empty means pass."""
    return [str(v) for v in violations(metrics, thresholds)]


@dataclasses.dataclass(frozen=True)
class Gate:
    """What judges one model x stage x check: its thresholds, and a declared upstream defect, if any, that
    may excuse a failure within the band it declares. An informational check has no thresholds by design."""

    thresholds: Thresholds
    defect: Any = None  # harness.pairs.ExpectedFailure declared for exactly this stage and check
    informational: bool = False

    def judge(self, metrics: dict[str, Any]) -> tuple[str, list[str]]:
        """A status and the sentences that explain it."""
        if not self.thresholds:
            if self.informational:
                return INFO, []
            return ERROR, ["no threshold in the gates file for this check, and a check not judged is not a pass; "
                           "add its [defaults.<stage>.<check>] table"]
        found = violations(metrics, self.thresholds)
        defect = self.defect
        if defect is None:
            return (FAIL if found else PASS), [str(v) for v in found]
        if not found:
            return FAIL, [f"declared upstream defect {defect.name} did not show: every threshold holds "
                          f"({defect.describe_band()}); the defect is fixed or no longer reached, so remove its "
                          f"declaration from the pair"]
        # Every band metric must lie in its band, violated or not: a band may pin the defect down by a metric
        # the gates do not bound (e.g. the error against the context the defect scores with).
        outside = [v for v in found if not defect.excuses(v.metric, v.value)]
        outside += [m for m in defect.band if not any(v.metric == m for v in found)
                    and not defect.excuses(m, metrics.get(m))]
        if outside:
            return FAIL, [str(v) for v in found] + [f"outside the band of declared defect {defect.name} "
                                                    f"({defect.describe_band()}; measured "
                                                    f"{', '.join(f'{m}={_fmt(metrics.get(m))}' for m in defect.band)})"]
        return XFAIL, [str(v) for v in found] + [f"within the band of declared upstream defect {defect.name} "
                                                 f"({defect.describe_band()}): {defect.reason}"]


def gate_for(gates: Gates, pair, stage: str, check: str, informational: bool = False) -> Gate:
    """The gate of one record: the gates file's thresholds and the pair's defect declared for this stage and check."""
    from harness.pairs import declared_defects

    defects = [d for d in declared_defects(pair) if d.stage == stage and d.check == check]
    return Gate(gates.thresholds(pair.name, stage, check), defects[0] if defects else None, informational)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
