"""Runs several pairs, each in a fresh process so a crash in one never loses the others' results."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from harness import report, stages
from harness.pairs import ModelPair
from harness.paths import display_path, scrub
from harness.provenance import harness_commit
from harness.pipeline import PairReport, Progress, RunOptions, planned_stages, verify_pair
from harness.records import ERROR, CheckResult, run_metadata


@dataclasses.dataclass
class SuiteRequest:
    """What a suite run needs, in a form a child process can be handed on its command line."""

    out_dir: Path
    gates_path: str
    cache_dir: str
    use_cache: bool = True
    quant: tuple[str, ...] | None = None
    num_threads: int = 2
    models_dirs: tuple[str, ...] = ()
    stages: tuple[str, ...] | None = None
    golden_dir: str | None = None  # None: the repository's golden/
    against: str | None = None  # "golden": the release gate, a missing golden is an error


def child_command(request: SuiteRequest, model: str, result_path: Path) -> list[str]:
    command = [sys.executable, "-m", "harness", "_verify-one", model, "--result", str(result_path),
               "--gates", request.gates_path, "--cache-dir", request.cache_dir, "--threads", str(request.num_threads)]
    if not request.use_cache:
        command.append("--no-cache")
    if request.quant is not None:
        command += ["--quant", ",".join(request.quant) or "none"]
    if request.stages:
        command += ["--stages", ",".join(request.stages)]
    for d in request.models_dirs:
        command += ["--models-dir", d]
    if request.golden_dir:
        command += ["--golden-dir", request.golden_dir]
    if request.against:
        command += ["--against", request.against]
    return command


def report_to_json(rep: PairReport) -> dict:
    return {"model": rep.model, "results": [r.to_json() for r in rep.results],
            "timings": rep.timings, "notes": rep.notes}


def run_isolated(request: SuiteRequest, pair: ModelPair, options: RunOptions,
                 echo: Callable[[str], None]) -> PairReport:
    """One pair in a child process; its progress lines are echoed live, a crash becomes an error record."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        proc = subprocess.Popen(child_command(request, pair.name, result_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        for line in proc.stdout:
            if line.startswith("[progress] "):
                echo(line[len("[progress] "):].rstrip("\n"))
            else:
                tail = (tail + [line.rstrip("\n")])[-15:]
        code = proc.wait()
        data = json.loads(result_path.read_text()) if result_path.exists() else {"results": [], "timings": {}}
        done = [CheckResult(**r) for r in data["results"]]
        if code == 0 and not data.get("partial"):
            return PairReport(data["model"], done, data["timings"], data["notes"])
    finished = {r.stage for r in done}
    planned = planned_stages(pair, options)
    # The first planned stage it had not reported; past the last one, its checks were running.
    stage = next((st for st in planned if st not in finished), planned[-1])
    message = f"the process verifying {pair.name} died with exit code {code} during {stage}; last output: " + \
        scrub(" | ".join(t for t in tail if t.strip()))[-1500:]
    return PairReport(pair.name, done + [CheckResult(pair.name, stage, stages.STAGE, ERROR, message=message)],
                      data["timings"], {})


def run_suite(pairs: list[ModelPair], request: SuiteRequest, options: RunOptions, echo: Callable[[str], None],
              unknown: list[str] = (), isolate: bool = True, unknown_message: Callable[[str], str] = str) -> dict:
    """Every pair in turn; the reports are rewritten atomically after each one."""
    run = run_metadata(gates=options.gates.path, quant=list(request.quant) if request.quant is not None else "default",
                       models=[p.name for p in pairs] + list(unknown),
                       cache=display_path(request.cache_dir) if request.use_cache else "private to the run (--no-cache)",
                       harness=harness_commit())
    results: list[CheckResult] = [CheckResult(name, stages.HF, stages.STAGE, ERROR, message=unknown_message(name))
                                  for name in unknown]
    models: dict = {}

    def progress(model: str, stage: str, seconds: float, produced: list[CheckResult]) -> None:
        echo(format_progress(model, stage, seconds, produced))

    document = report.parity_document(run, results, models)
    for pair in pairs:
        rep = run_isolated(request, pair, options, echo) if isolate else verify_pair(pair, options, progress)
        results.extend(rep.results)
        models[pair.name] = {"description": pair.description, "features": list(pair.features),
                             "expected_failures": [dataclasses.asdict(d) for d in pair.expected_failures],
                             "timings": rep.timings, "notes": rep.notes}
        document = report.parity_document(run, results, models)
        report.write_parity(request.out_dir, document)
        report.write_summary(request.out_dir, document)
    report.write_parity(request.out_dir, document)
    report.write_summary(request.out_dir, document)
    return document


def format_progress(model: str, stage: str, seconds: float, produced: list[CheckResult]) -> str:
    checks = ", ".join(f"{r.check} {r.status}" for r in produced)
    worst = next((r.message for r in produced if r.message and r.status != "pass"), "")
    return f"[{model}] {stage:<24} {seconds:6.1f}s  {checks}" + (f"  -- {worst[:200]}" if worst else "")
