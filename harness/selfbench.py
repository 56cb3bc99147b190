"""Where the harness's own time goes, cold and warm, and how a change moves it: old and new side by side.

`nox -s selfbench [-- --base REF --rounds N [-- VERIFY ARGS]]` runs `harness verify` of this checkout and of REF (checked out
into a temporary directory, run with the same environment) back to back, alternating, each with its own
cache: once cold (an empty cache) and N times warm. It reports each run's wall time, the time of each stage
and of its parts (checkpoint, export, lowering, conversion: RunState.timed), what fell outside the stages
(process starts, imports, reports), the ratios new/old, and whether the two gave the same records (timings
aside). The machine is noisy: only ratios of runs made side by side mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from harness.paths import PROJECT_ROOT
from harness.report import write_report

SELFBENCH_JSON = "selfbench.json"
SELFBENCH_MD = "selfbench.md"


def checkout(ref: str, into: Path) -> str:
    """A clean copy of the project at `ref` (a commit of this repository); returns its full commit id."""
    commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"selfbench: --base {ref!r} is not a commit of this repository ({commit.stderr.strip()})")
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(PROJECT_ROOT), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "--quiet", commit.stdout.strip()], check=True)
    return commit.stdout.strip()


def run_verify(project: Path, cache: Path, out: Path, args: list[str]) -> dict:
    """One `harness verify` of `project`'s code (its own directory first on the path), timed from outside."""
    env = {**os.environ, "EDGE_PARITY_CACHE": str(cache), "PYTHONPATH": str(project)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", "verify", "--out", str(out), *args], cwd=project,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    document = json.loads((out / "parity.json").read_text()) if (out / "parity.json").exists() else None
    if document is None:
        raise SystemExit(f"selfbench: harness verify in {project.name} wrote no report (exit {proc.returncode}): "
                         + proc.stdout[-2000:] + proc.stderr[-2000:])
    return {"wall_s": round(wall, 2), "exit": proc.returncode, **profile(document)}


def profile(document: dict) -> dict:
    """A run's stage and part timings summed over its pairs, the cache's tally, and its records."""
    stage_s: dict[str, float] = {}
    part_s: dict[str, float] = {}
    cache = {"hits": 0, "misses": 0}
    for model in document.get("models", {}).values():
        for stage, seconds in model.get("timings", {}).items():
            stage_s[stage] = stage_s.get(stage, 0.0) + seconds
        for part, seconds in model.get("notes", {}).get("seconds", {}).items():
            part_s[part] = part_s.get(part, 0.0) + seconds
        for key in cache:
            cache[key] += model.get("notes", {}).get("cache", {}).get(key, 0)
    records = sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
                     for r in document.get("results", []))
    return {"jobs": document.get("run", {}).get("jobs", 1), "stages_s": {k: round(v, 2) for k, v in stage_s.items()},
            "parts_s": {k: round(v, 2) for k, v in part_s.items()}, "cache": cache,
            "status": document.get("run", {}).get("status"), "records": records}


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per side and temperature: the median wall time, stages and parts; ratios new/old; records equal."""
    out: dict = {"sides": {}, "ratios": {}, "same_records": {}}
    for side, temps in runs.items():
        out["sides"][side] = {}
        for temp, rs in temps.items():
            stages = {s for r in rs for s in r["stages_s"]}
            parts = {p for r in rs for p in r["parts_s"]}
            wall = statistics.median(r["wall_s"] for r in rs)
            inside = statistics.median(sum(r["stages_s"].values()) for r in rs)
            jobs = max(r.get("jobs", 1) for r in rs)
            out["sides"][side][temp] = {
                "runs": len(rs), "jobs": jobs, "wall_s": round(wall, 1),
                # Only one pair at a time leaves a remainder that is the time outside the stages.
                "outside_stages_s": round(wall - inside, 1) if jobs == 1 else None,
                "stages_s": {s: round(statistics.median(r["stages_s"].get(s, 0.0) for r in rs), 1) for s in sorted(stages)},
                "parts_s": {p: round(statistics.median(r["parts_s"].get(p, 0.0) for r in rs), 1) for p in sorted(parts)},
                "cache": rs[-1]["cache"], "exits": [r["exit"] for r in rs]}
    if {"base", "new"} <= set(runs):
        out["record_changes"] = {}
        for temp in runs["new"]:
            old, new = out["sides"]["base"][temp], out["sides"]["new"][temp]
            out["ratios"][temp] = {"wall": round(new["wall_s"] / old["wall_s"], 3)}
            pairs = list(zip(runs["base"][temp], runs["new"][temp]))
            out["same_records"][temp] = all(a["records"] == b["records"] for a, b in pairs)
            if not out["same_records"][temp]:
                first = next((a, b) for a, b in pairs if a["records"] != b["records"])
                out["record_changes"][temp] = record_changes(first[0]["records"], first[1]["records"])
    return out


def record_changes(base: list[str], new: list[str]) -> dict:
    """How two runs' records differ, by model x stage x check: the checks only one side ran (counted by stage and
    check), those whose status moved, and how many kept their status but measured other values. Comparing with a
    commit that had fewer checks, this says whether the checks both ran gave the same verdicts."""
    def keyed(records: list[str]) -> dict[tuple[str, str, str], dict]:
        return {(r["model"], r["stage"], r["check"]): r for r in map(json.loads, records)}

    def by_check(keys) -> dict[str, int]:
        return dict(sorted(Counter(f"{stage}.{check}" for _, stage, check in keys).items()))

    old, now = keyed(base), keyed(new)
    both = sorted(set(old) & set(now))
    return {"only_base": by_check(set(old) - set(now)), "only_new": by_check(set(now) - set(old)),
            "in_both": len(both),
            "status_changed": [{"model": m, "stage": s, "check": c, "base": old[(m, s, c)]["status"],
                                "new": now[(m, s, c)]["status"]}
                               for m, s, c in both if old[(m, s, c)]["status"] != now[(m, s, c)]["status"]],
            "other_values": sum(old[k] != now[k] for k in both if old[k]["status"] == now[k]["status"])}


def render(summary: dict, meta: dict) -> str:
    lines = [f"# edge-parity selfbench: {meta['pairs']}", "",
             f"new: {meta['new']}; base: {meta.get('base', 'none')}; host: {meta['host']}; "
             f"{meta['rounds']} warm round(s) per side, alternating, after one cold run each (empty cache).", ""]
    for temp in ("cold", "warm"):
        rows, names = [], set()
        for side in summary["sides"].values():
            names |= set(side.get(temp, {}).get("stages_s", {})) | {f"({p})" for p in side.get(temp, {}).get("parts_s", {})}
        order = ["wall", "pairs at once", "outside stages", *sorted(n for n in names if not n.startswith("(")),
                 *sorted(n for n in names if n.startswith("("))]
        sides = [s for s in ("base", "new") if temp in summary["sides"].get(s, {})]
        if not sides:
            continue
        for name in order:
            row = [name]
            for side in sides:
                data = summary["sides"][side][temp]
                row.append(data["wall_s"] if name == "wall" else data["jobs"] if name == "pairs at once"
                           else data["outside_stages_s"] if name == "outside stages" else data["parts_s"].get(name[1:-1]) if name.startswith("(") else data["stages_s"].get(name))
            if len(sides) == 2 and name != "pairs at once" and all(isinstance(v, (int, float)) and v for v in row[1:]):
                row.append(f"{row[2] / row[1]:.2f}")
            rows.append(row)
        lines += [f"## {temp} (median seconds; stages and parts summed over pairs, parts in parentheses inside "
                  "their stage; pairs run side by side overlap, so their sums pass the wall time and each is "
                  "slowed by the other; outside stages: process starts, imports and reports, shown for one pair "
                  "at a time)", "",
                  tabulate(rows, headers=["", *sides, *(["new/base"] if len(sides) == 2 else [])], tablefmt="github"),
                  ""]
        if temp in summary["same_records"]:
            lines.append(f"Same records (timings aside): {'yes' if summary['same_records'][temp] else 'NO'}.")
            if temp in summary["record_changes"]:
                lines.append(render_record_changes(summary["record_changes"][temp]))
            lines.append("")
    return "\n".join(lines)


def render_record_changes(changes: dict) -> str:
    """record_changes in a few lines: what only one side checked, and every verdict that moved."""
    def listed(counts: dict[str, int]) -> str:
        return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"

    moved = changes["status_changed"]
    lines = [f"Checks only base ran: {listed(changes['only_base'])}.",
             f"Checks only new ran: {listed(changes['only_new'])}.",
             f"Of the {changes['in_both']} both ran, {len(moved)} changed status and {changes['other_values']} kept "
             "it with other values or messages" + (":" if moved else ".")]
    lines += [f"- {m['model']} {m['stage']}.{m['check']}: {m['base']} -> {m['new']}" for m in moved]
    return "\n".join(lines)


def host() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{os.cpu_count()} cores, {' '.join(isa) or 'isa unknown'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a commit to compare with (e.g. HEAD~3); none: this checkout alone")
    parser.add_argument("--rounds", type=int, default=2, help="warm runs per side (default 2)")
    parser.add_argument("--out", default="reports/selfbench", help="where selfbench.json and .md go")
    argv = sys.argv[1:] if argv is None else list(argv)
    own, verify_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser.epilog = "Arguments after a second `--` go to harness verify, e.g. -- --models tiny_llama."
    args = parser.parse_args(own)
    args.verify_args = verify_args
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="edge-parity-selfbench-") as tmp:
        tmp = Path(tmp)
        projects = {"new": PROJECT_ROOT}
        meta = {"new": "this checkout", "host": host(), "rounds": args.rounds,
                "pairs": " ".join(args.verify_args) or "the default suite"}
        if args.base:
            meta["base"] = f"{args.base} ({checkout(args.base, tmp / 'base')[:12]})"
            projects = {"base": tmp / "base", **projects}
        runs: dict[str, dict[str, list[dict]]] = {side: {"cold": [], "warm": []} for side in projects}
        plan = [(side, "cold") for side in projects] + [(side, "warm") for _ in range(args.rounds) for side in projects]
        for index, (side, temp) in enumerate(plan):
            result = run_verify(projects[side], tmp / f"cache-{side}", tmp / f"out-{index}", args.verify_args)
            print(f"selfbench: {side} {temp}: {result['wall_s']:.1f}s (exit {result['exit']})", flush=True)
            runs[side][temp].append(result)
    summary = summarise(runs)
    raw = {side: {temp: [{k: v for k, v in r.items() if k != "records"} for r in rs] for temp, rs in temps.items()}
           for side, temps in runs.items()}  # every run, for ratios of another kind than the median's
    write_report(out / SELFBENCH_JSON, json.dumps({"meta": meta, **summary, "runs": raw}, indent=1, sort_keys=True))
    text = render(summary, meta)
    write_report(out / SELFBENCH_MD, text)
    print(text)
    return 0 if all(summary["same_records"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
