"""`harness golden update`: re-record a pair's golden, refuse one whose stages fail parity, say what moved.

The diff of the four parts: an update prints one line per fact that changed (versions, host,
definition, trajectories, per-stage logits), and re-recording an unchanged run writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any

import numpy as np

from harness import stages
from harness.gates import Gates
from harness.golden.compare import common_prefix
from harness.golden.serialise import STATS, dumps, failing_stages, parity_of, record
from harness.golden.store import golden_path, read_recorded, save
from harness.pairs import ModelPair
from harness.paths import display_path
from harness.records import FAIL, CheckResult


def _flat_versions(doc: dict) -> dict[str, str]:
    return {**doc["provenance"].get("versions", {}), "python": doc["provenance"].get("python")}


def render_diff(old: dict | None, new: dict, path: Path) -> str:
    """What moved between two goldens of a pair, one line per fact; 'unchanged' when nothing did."""
    if old is None:
        return f"{display_path(path)}: new golden, stages {', '.join(new['stages'])}"
    lines = []
    a, b = _flat_versions(old), _flat_versions(new)
    lines += [f"  version {k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    was_isa, now_isa = old["provenance"].get("host", {}).get("isa"), new["provenance"]["host"]["isa"]
    if was_isa != now_isa:
        lines.append(f"  recording host's instruction sets: {', '.join(was_isa) if was_isa else 'not recorded'} -> "
                     f"{', '.join(now_isa)}")
    if old["provenance"].get("pair_fingerprint") != new["provenance"]["pair_fingerprint"]:
        was, now = str(old["provenance"].get("pair_fingerprint"))[:12], new["provenance"]["pair_fingerprint"][:12]
        lines.append(f"  pair definition changed (fingerprint {was} -> {now})")
    was, now = old["provenance"].get("forced") or {}, new["provenance"].get("forced") or {}
    if was.get("reason") != now.get("reason"):
        lines.append(f"  forced reason: {was.get('reason')!r} -> {now.get('reason')!r}")
    if list(was.get("failing", {})) != list(now.get("failing", {})):
        lines.append(f"  stages failing parity: {list(was.get('failing', {}))} -> {list(now.get('failing', {}))}")
    elif was.get("failing") != now.get("failing"):
        lines.append("  parity failure messages changed: " + "; ".join(
            f"{st}: {' / '.join(m)[:160]}" for st, m in now["failing"].items() if was["failing"].get(st) != m))
    if old["prompts"] != new["prompts"]:
        lines.append("  HF trajectories changed: " + ", ".join(
            f"prompt {i} from token {common_prefix(o['tokens'], n['tokens'])}"
            for i, (o, n) in enumerate(zip(old["prompts"], new["prompts"])) if o != n))
    for stage in new["stages"]:
        if stage not in old["stages"]:
            lines.append(f"  {stage}: added")
    for stage in old["stages"]:
        if stage not in new["stages"]:
            lines.append(f"  {stage}: removed (did not produce outputs in this run)")
    for stage, entry in new["stages"].items():
        if stage in old["stages"]:
            lines += [f"  {stage}: {line}" for line in _stage_diff(old["stages"][stage], entry)]
    return f"{display_path(path)}: " + ("unchanged" if not lines else "changed\n" + "\n".join(lines))


def _flat_gates(gates: dict) -> dict[str, Any]:
    return {f"{check}.{key}": value for check, table in gates.items() for key, value in table.items()}


def _stage_diff(old: dict, new: dict) -> list[str]:
    lines = []
    if old.get("parity") != new.get("parity"):
        lines.append(f"parity {old.get('parity')} -> {new.get('parity')}")
    was, now = _flat_gates(old.get("gates", {})), _flat_gates(new.get("gates", {}))
    lines += [f"gate {k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    for i, (o, n) in enumerate(zip(old["greedy"], new["greedy"])):
        if o != n:
            lines.append(f"prompt {i} greedy {o} -> {n}")
    worst, top1 = (0.0, None), 0
    for i, (orows, nrows) in enumerate(zip(old["top_k"], new["top_k"])):
        for p, (o, n) in enumerate(zip(orows, nrows)):
            top1 += o["ids"][0] != n["ids"][0]
            before = dict(zip(o["ids"], o["logits"]))
            for tok, value in zip(n["ids"], n["logits"]):
                if tok in before and abs(value - before[tok]) > worst[0]:
                    worst = (abs(value - before[tok]), f"prompt {i} position {p} token {tok}: {before[tok]} -> {value}")
    if top1:
        lines.append(f"top-1 token changed at {top1} positions")
    if worst[1]:
        lines.append(f"top-k logits moved by up to {worst[0]:.4g} ({worst[1]})")
    elif any(o["ids"] != n["ids"] for orows, nrows in zip(old["top_k"], new["top_k"]) for o, n in zip(orows, nrows)):
        lines.append("top-k ids changed")
    for i, (o, n) in enumerate(zip(old["stats"], new["stats"])):
        if o != n:
            lines.append(f"prompt {i} stats " + ", ".join(f"{k} {o[k]} -> {n[k]}" for k in STATS if o[k] != n[k]))
    return lines


def recipes_to_record(pair: ModelPair, golden_dir: Path, extra: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The pair's default recipes, those its golden already holds, and any asked for: an update never
    drops a recipe just because this run did not name it."""
    wanted = set(pair.default_quant) | set(extra or ())
    recorded = read_recorded(golden_dir, pair.name)
    held = recorded["stages"] if recorded else {}
    wanted |= {stages.recipe_of(s) for s in held if stages.is_quantized(s)}
    return tuple(r for r in stages.QUANT_RECIPES if r in wanted and r in pair.quant_recipes)


def _without_date(doc: dict) -> str:
    return dumps({**doc, "provenance": {**doc["provenance"], "recorded": None}})


@dataclasses.dataclass
class UpdateOutcome:
    """What `golden update` did for one pair, and the diff it prints."""

    model: str
    path: Path
    status: str  # "recorded", "unchanged" or "refused"
    diff: str
    refused: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # stage -> failing checks


def update(pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories, results: list[CheckResult],
           gates: Gates, golden_dir: Path,
           force_reason: str | None = None, today: str | None = None,
           versions: dict[str, str] | None = None) -> UpdateOutcome:
    """Re-records a pair's golden unless a stage fails parity (and no reason forces it); keeps the
    recorded date when nothing else changed, so re-recording is byte-for-byte reproducible."""
    path = golden_path(golden_dir, pair.name)
    failing = {}
    for stage in failing_stages(results):
        status, messages = parity_of(results, stage)
        if status == FAIL:
            failing[stage] = messages
    detail = "; ".join(f"{s}: {' / '.join(m)[:300]}" for s, m in failing.items())
    if not trajectories:
        return UpdateOutcome(pair.name, path, "refused", f"{display_path(path)}: refused, the HF reference produced no "
                             f"outputs, so there is nothing to record ({detail})", failing)
    if failing and not force_reason:
        return UpdateOutcome(pair.name, path, "refused",
                             f"{display_path(path)}: refused, stages fail parity ({detail}); fix them, or record anyway with "
                             f"`harness golden update --models {pair.name} --force --reason \"why\"`", failing)
    today = today or datetime.date.today().isoformat()
    new = record(pair, logits, trajectories, results, gates, recorded=today, versions=versions, forced=force_reason)
    old = read_recorded(golden_dir, pair.name)
    if old is not None and _without_date(old) == _without_date(new):
        new["provenance"]["recorded"] = old["provenance"]["recorded"]
    diff = render_diff(old, new, path)
    text = dumps(new)
    if path.exists() and path.read_text() == text:
        return UpdateOutcome(pair.name, path, "unchanged", diff)
    if old is None and path.exists():
        diff = f"{display_path(path)}: replaced an unreadable golden; stages {', '.join(new['stages'])}"
    save(golden_dir, new)
    return UpdateOutcome(pair.name, path, "recorded", diff)
