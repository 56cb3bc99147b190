"""A golden document: recorded from one run's logits, written as diffable text, read back validated.

The serialiser of the four parts (serialise, store, compare, update): it knows the document's shape
and nothing of where it lives, so recording twice from the same outputs gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform
from typing import Any

import numpy as np

from harness import stages
from harness.errors import GoldenError
from harness.gates import Gates
from harness.pairs import ModelPair, describe, fingerprint
from harness.records import ERROR, FAIL, PASS, XFAIL, CheckResult, isa_features, library_versions
from harness.workload import greedy_of

SCHEMA_VERSION = 1
GOLDEN = stages.GOLDEN
TOP_K = 5
DECIMALS = 4  # logits and statistics are stored rounded to this many decimal places
STATS = ("mean", "std", "min", "max")
FIXED_KEYS = ("top_k", "stats")  # floats under them are rounded to `decimals` and written with that many places
NOT_IN_CHAIN = ("hypothesis",)  # tracked by records.library_versions, but shapes no output
# The fields that fix a pair's prompts and reference weights: if they differ, nothing is comparable.
REFERENCE_FIELDS = ("name", "hf_class", "hf_config", "workload", "seed", "init_std", "checkpoint_builder")


def update_command(model: str) -> str:
    """The command every message about a missing, broken or outdated golden names as its fix."""
    return f"harness golden update --models {model}"


def reference_key(pair: ModelPair) -> str:
    """Hash of what decides the prompts and the reference weights (the builders are left out)."""
    text = json.dumps({f: describe(getattr(pair, f)) for f in REFERENCE_FIELDS}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def chain_versions(versions: dict[str, str] | None = None) -> dict[str, str]:
    """The versions of the libraries that shape the outputs, sorted."""
    versions = versions if versions is not None else library_versions()
    return {k: v for k, v in sorted(versions.items()) if k not in NOT_IN_CHAIN}


def _round(x: float, decimals: int) -> float:
    return round(float(x), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def stage_names(logits: dict[str, Any]) -> list[str]:
    """The stages that produced logits, in pipeline order."""
    quant = [stages.tflite_stage(r) for r in stages.QUANT_RECIPES]
    return [s for s in (*stages.FLOAT_STAGES, *quant) if s in logits]


# ---------------------------------------------------------------- recording

def record_stage(logits: list[np.ndarray], trajectories, top_k: int = TOP_K, decimals: int = DECIMALS) -> dict:
    """Top-k ids and logits at every position, greedy ids and statistics, per prompt."""
    rows, greedy, stats = [], [], []
    for lg, traj in zip(logits, trajectories, strict=True):
        order = np.argsort(-lg, axis=-1, kind="stable")[:, :top_k]
        rows.append([{"ids": [int(i) for i in ids], "logits": [_round(v, decimals) for v in lg[p, ids]]}
                     for p, ids in enumerate(order)])
        greedy.append([int(t) for t in greedy_of(lg, traj)])
        lg64 = lg.astype(np.float64)
        stats.append({"mean": _round(lg64.mean(), decimals), "std": _round(lg64.std(), decimals),
                      "min": _round(lg64.min(), decimals), "max": _round(lg64.max(), decimals)})
    return {"greedy": greedy, "stats": stats, "top_k": rows}


def parity_of(results: list[CheckResult], stage: str) -> tuple[str, list[str]]:
    """A stage's parity verdict from its checks (golden excluded), and the failing checks' messages."""
    mine = [r for r in results if r.stage == stage and r.check != GOLDEN]
    bad = [f"{r.check}: {r.message}" for r in mine if r.status in (FAIL, ERROR)]
    if bad:
        return FAIL, bad
    if any(r.status == XFAIL for r in mine):
        return XFAIL, [f"{r.check}: {r.message}" for r in mine if r.status == XFAIL]
    return PASS, []


def failing_stages(results: list[CheckResult]) -> list[str]:
    """The stages with a failing, erroring or expected-failing parity check, in the order they ran."""
    seen = []
    for r in results:
        if r.check != GOLDEN and r.stage != GOLDEN and r.status in (FAIL, ERROR, XFAIL) and r.stage not in seen:
            seen.append(r.stage)
    return seen


def record(pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories, results: list[CheckResult],
           gates: Gates, *, recorded: str, versions: dict[str, str] | None = None, forced: str | None = None,
           isa: list[str] | None = None) -> dict:
    """A golden document from one run's logits per stage; key order is fixed here, so output is reproducible."""
    entries = {}
    for stage in stage_names(logits):
        status, _ = parity_of(results, stage)
        gates_in_force = gates.stage_table(pair.name, stage)
        entries[stage] = {"parity": status, "gates": gates_in_force, **record_stage(logits[stage], trajectories)}
    failing = {s: parity_of(results, s)[1] for s in failing_stages(results)}
    provenance = {
        "recorded": recorded,
        "pair_fingerprint": fingerprint(pair),
        "reference_key": reference_key(pair),
        "python": platform.python_version(),
        "versions": chain_versions(versions),
        # XNNPack picks its kernels by instruction set; a quantized stage's last rounding steps follow them.
        "host": {"machine": platform.machine(), "isa": isa_features() if isa is None else list(isa)},
    }
    if forced:
        provenance["forced"] = {"reason": forced, "failing": failing}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": pair.name,
        "provenance": provenance,
        "format": {"top_k": TOP_K, "decimals": DECIMALS},
        "prompts": [{"prompt_len": int(t.prompt_len), "tokens": [int(x) for x in t.tokens]} for t in trajectories],
        "stages": entries,
    }


# ---------------------------------------------------------------- text

def dumps(document: dict) -> str:
    """Indented JSON whose innermost containers sit on one line (one position per line, so diffs read
    well); stored logits and statistics are written with exactly `format.decimals` places."""
    decimals = document.get("format", {}).get("decimals", DECIMALS)

    def inline(value) -> bool:
        if isinstance(value, dict):
            return all(not isinstance(v, (dict, list)) or (isinstance(v, list) and inline(v)) for v in value.values())
        return all(not isinstance(v, (dict, list)) for v in value)

    def scalar(value, fixed: bool) -> str:
        if fixed and isinstance(value, float):
            return f"{value:.{decimals}f}"
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v, fixed) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {scalar(v, fixed or k in FIXED_KEYS)}"
                                   for k, v in value.items()) + "}"
        return json.dumps(value, ensure_ascii=False, allow_nan=False)

    def enc(value, depth: int, fixed: bool) -> str:
        if isinstance(value, (dict, list)) and value and not inline(value):
            pad, inner = " " * depth, " " * (depth + 1)
            if isinstance(value, dict):
                items = [f"{inner}{json.dumps(k)}: {enc(v, depth + 1, fixed or k in FIXED_KEYS)}"
                         for k, v in value.items()]
                return "{\n" + ",\n".join(items) + f"\n{pad}}}"
            return "[\n" + ",\n".join(f"{inner}{enc(v, depth + 1, fixed)}" for v in value) + f"\n{pad}]"
        return scalar(value, fixed)

    return enc(document, 0, False) + "\n"


def parse(text: str, where: str, model: str) -> dict:
    """A golden document from its text, validated, or a GoldenError naming the file and the fix."""
    fix = f"regenerate it with `{update_command(model)}`"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise GoldenError(f"golden file {where} is corrupt (not valid JSON: {e}); {fix}") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise GoldenError(f"golden file {where} is corrupt (no schema_version); {fix}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise GoldenError(f"golden file {where} has schema version {doc['schema_version']!r}, but this harness "
                          f"reads version {SCHEMA_VERSION}; {fix}")
    problem = shape_problem(doc)
    if problem:
        raise GoldenError(f"golden file {where} is corrupt ({problem}); {fix}")
    return doc


def shape_problem(doc: dict) -> str | None:
    """The first structural defect of a document, in words; None when it is well formed."""
    for key, kind in (("model", str), ("provenance", dict), ("format", dict), ("prompts", list), ("stages", dict)):
        if not isinstance(doc.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    if not isinstance(doc["provenance"].get("reference_key"), str):
        return "provenance.reference_key is missing"
    if not all(isinstance(doc["format"].get(k), int) for k in ("top_k", "decimals")):
        return "format.top_k or format.decimals is missing"
    lengths = []
    for i, p in enumerate(doc["prompts"]):
        if not (isinstance(p, dict) and isinstance(p.get("tokens"), list) and isinstance(p.get("prompt_len"), int)):
            return f"prompts[{i}] lacks tokens or prompt_len"
        lengths.append(len(p["tokens"]) - 1)
    for stage, entry in doc["stages"].items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), list) for k in ("greedy", "stats", "top_k")):
            return f"stages.{stage} lacks greedy, stats or top_k"
        if [len(rows) for rows in entry["top_k"]] != lengths or len(entry["stats"]) != len(lengths):
            return f"stages.{stage} has {[len(r) for r in entry['top_k']]} positions per prompt, the prompts {lengths}"
        for i, rows in enumerate(entry["top_k"]):
            for p, row in enumerate(rows):
                ok = (isinstance(row, dict) and isinstance(row.get("ids"), list) and isinstance(row.get("logits"), list)
                      and len(row["ids"]) == len(row["logits"]) > 0
                      and all(isinstance(v, (int, float)) for v in row["ids"] + row["logits"]))
                if not ok:
                    return f"stages.{stage}.top_k[{i}][{p}] is not ids and logits of equal length"
        for i, s in enumerate(entry["stats"]):
            if not (isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) for k in STATS)):
                return f"stages.{stage}.stats[{i}] lacks {', '.join(STATS)}"
    return None
