"""A run split across machines: a deterministic share of the pairs per shard, and the shards' reports merged.

The CI system's job matrix is the distributed engine: shard I of N runs `assign(...)[I - 1]`, each shard
writes its own parity.json, and `merge` joins them into the document one unsharded run would have written
(same records, same order), refusing shards that ran different code, libraries or gates.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.records import COMPLETE, INTERRUPTED, RUNNING

COSTS_FILE = Path(__file__).with_name("data") / "pair_seconds.json"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' as (I, N), 1 <= I <= N."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not (1 <= i <= n):
        raise HarnessError(f"--shard {text!r}: give I/N with 1 <= I <= N, e.g. --shard 1/2")
    return i, n


def pair_costs(path: Path = COSTS_FILE) -> dict[str, float]:
    return {k: float(v) for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def assign(names: list[str], count: int, costs: dict[str, float]) -> list[list[str]]:
    """Longest first, each pair to the shard with the least cost so far (the lowest index on a tie); each
    shard keeps the given order. Depends only on the names and costs, so every job computes the same split."""
    default = statistics.median(costs.values()) if costs else 1.0
    totals, members = [0.0] * count, [set() for _ in range(count)]
    for name in sorted(names, key=lambda n: (-costs.get(n, default), n)):
        target = min(range(count), key=lambda i: (totals[i], i))
        totals[target] += costs.get(name, default)
        members[target].add(name)
    return [[n for n in names if n in share] for share in members]


# ---------------------------------------------------------------- merging shard reports

# Run metadata every shard must share: merged records are comparable only if made by the same code.
MUST_MATCH = {"versions": "library versions", "gates": "gates file", "gates_sha256": "gates",
              "harness": "harness commit", "quant": "quant recipes", "shard_of": "selection of pairs split"}


def read_document(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "parity.json"
    if not path.is_file():
        raise HarnessError(f"{directory} holds no parity.json; pass the --out directories of `harness verify` runs")
    return json.loads(path.read_text())


def merge(documents: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, Any]:
    """One parity document from shard documents, whatever order they come in. Pairs appear in the order
    of the selection the shards split (run.shard_of), else in `order` (the registry's), then by name."""
    if not documents:
        raise HarnessError("report merge needs at least one shard directory")
    documents = sorted(documents, key=lambda d: (d["run"].get("shard") or "", sorted(d["models"])))
    first = documents[0]["run"]
    for doc in documents[1:]:
        if doc.get("schema_version") != documents[0].get("schema_version"):
            raise HarnessError("shards differ in their report schema version; re-run them with one harness")
        for key, what in MUST_MATCH.items():
            if doc["run"].get(key) != first.get(key):
                raise HarnessError(f"shards differ in their {what} ({key}: {first.get(key)} vs "
                                   f"{doc['run'].get(key)}); merge only shards of one run, re-run the odd one")
    seen: dict[str, int] = {}
    for number, doc in enumerate(documents):
        for model in {r["model"] for r in doc["results"]}:
            if model in seen:
                raise HarnessError(f"pair {model} is in two shards; merge the shards of one split (--shard I/N "
                                   "with one N), each once")
            seen[model] = number
    rank = {name: i for i, name in enumerate(first.get("shard_of") or order or [])}
    models = sorted(seen, key=lambda m: (rank.get(m, len(rank)), m))
    by_model = {m: [r for r in documents[seen[m]]["results"] if r["model"] == m] for m in models}
    statuses = {d["run"].get("status", COMPLETE) for d in documents}
    status = INTERRUPTED if INTERRUPTED in statuses else RUNNING if RUNNING in statuses else COMPLETE
    run = {**first, "status": status, "models": models,
           "started": min(d["run"].get("started", "") for d in documents),
           "shards": [{k: d["run"].get(k) for k in ("shard", "started", "host", "status")}
                      | {"models": sorted(d["models"])} for d in documents]}
    run.pop("shard", None)  # shard_of stays: the merged run is that selection
    run.pop("stopped", None)
    stopped = [d["run"]["stopped"] for d in documents if d["run"].get("stopped")]
    if stopped:
        run["stopped"] = " ".join(stopped)
    info = {m: documents[seen[m]]["models"][m] for m in models if m in documents[seen[m]]["models"]}
    return {"schema_version": documents[0].get("schema_version"), "run": run,
            "models": info, "results": [r for m in models for r in by_model[m]]}
