"""Runs several pairs, each in a process of its own so a crash in one never loses the others' results.

`run_suite` is the library call `harness verify` makes: a RunConfig in, the parity document out (written
atomically after every pair). Each pair's child receives the same RunConfig as JSON (harness.child).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import signal
from pathlib import Path
from typing import Callable

from harness import child, report, stages
from harness.config import RunConfig
from harness.pairs import DEFAULT_SUITE, ModelPair, declared_defects, discover, scan, select, unknown_model_message
from harness.paths import display_path, scrub
from harness.pipeline import ExtraCheck, PairReport, Progress, RunOptions, planned_stages, verify_pair
from harness.provenance import harness_commit
from harness.records import COMPLETE, ERROR, INTERRUPTED, NOT_RUN, RUNNING, CheckResult, run_metadata

Echo = Callable[[str], None]


def verify_checks(config: RunConfig) -> tuple[ExtraCheck, ...]:
    """The extra checks of `harness verify`: the properties' seeded sample, and the goldens."""
    from harness.golden import GoldenCheck
    from harness.properties import property_checks

    return (property_checks, GoldenCheck(Path(config.golden_dir), strict=config.against == "golden"))


def report_to_json(rep: PairReport) -> dict:
    return {"model": rep.model, "results": [r.to_json() for r in rep.results],
            "timings": rep.timings, "notes": rep.notes}


def report_from_json(data: dict) -> PairReport:
    return PairReport(data["model"], [CheckResult(**r) for r in data["results"]], data["timings"], data["notes"])


def verify_pair_job(payload: dict, channel: child.Channel) -> dict:
    """The child's side of `harness verify`: one pair, progress as events, what it finished saved after each step."""
    config = RunConfig.from_json(payload["config"])
    pair = discover(tuple(Path(d) for d in config.models_dirs))[payload["model"]]
    options = RunOptions.open(config, verify_checks(config))
    done = PairReport(pair.name, [], {}, {})

    def tell(model, stage, seconds, produced):
        channel.partial(report_to_json(done))  # saved before it is told: a child stopped after the line keeps it
        channel.event(progress=format_progress(model, stage, seconds, produced))

    with options.cache:
        verified = verify_pair(pair, options, collecting(done, tell))
    import torch

    verified.notes["torch_threads"] = torch.get_num_threads()  # what the child ran with (children_threads)
    return report_to_json(verified)


def collecting(done: PairReport, tell: Progress) -> Progress:
    """A progress callback that first keeps each finished stage in `done`, then tells: what was said is kept."""

    def progress(model, stage, seconds, produced):
        done.results.extend(produced)
        done.timings[stage] = seconds
        tell(model, stage, seconds, produced)

    return progress


INTERRUPTED_CODES = (130, -signal.SIGINT)  # a child's exit on Ctrl-C (child.main), or SIGINT's default action


class PairInterrupted(KeyboardInterrupt):
    """Ctrl-C during a pair: what it finished, and a not-run record for the step it was in."""

    def __init__(self, report: PairReport):
        super().__init__(report.model)
        self.report = report


def _empty_report(model: str) -> dict:
    return {"model": model, "results": [], "timings": {}, "notes": {}}


def _current_stage(pair: ModelPair, options: RunOptions, done: PairReport) -> str:
    """The first planned stage the pair had not reported; past the last one, its checks were running."""
    finished = {r.stage for r in done.results}
    planned = [spec.name for spec in planned_stages(pair, options)]
    return next((st for st in planned if st not in finished), planned[-1])


def _stopped_report(pair: ModelPair, options: RunOptions, done: PairReport) -> PairReport:
    stage = _current_stage(pair, options, done)
    return dataclasses.replace(done, results=done.results + [CheckResult(
        pair.name, stage, stages.STAGE_RUN, NOT_RUN,
        message=f"interrupted during {stage}: this stage and the ones after it did not run")])


def run_isolated(config: RunConfig, pair: ModelPair, options: RunOptions, echo: Echo) -> PairReport:
    """One pair in a child process; its progress lines are echoed live, a crash becomes an error record,
    Ctrl-C a PairInterrupted holding what the child finished."""
    try:
        return report_from_json(child.run("verify_pair", {"config": config.to_json(), "model": pair.name},
                                          on_event=lambda event: echo(event["progress"]), forked=True))
    except child.Interrupted as stop:
        raise PairInterrupted(_stopped_report(pair, options, report_from_json(
            stop.partial["result"] if stop.partial else _empty_report(pair.name)))) from None
    except child.ChildFailed as e:
        if e.code in INTERRUPTED_CODES:  # the child was stopped by Ctrl-C (a terminal's, or stop_running's)
            raise PairInterrupted(_stopped_report(pair, options, report_from_json(
                e.partial or _empty_report(pair.name)))) from None
        failure = e
    done = report_from_json(failure.partial or _empty_report(pair.name))
    stage = _current_stage(pair, options, done)
    message = (f"the process verifying {pair.name} died with exit code {failure.code} during {stage}; "
               + ("where it crashed: " if failure.stack else "last output: ") + scrub(failure.output()))
    return dataclasses.replace(done, results=done.results + [
        CheckResult(pair.name, stage, stages.STAGE_RUN, ERROR, message=message)])


def run_in_process(pair: ModelPair, options: RunOptions, echo: Echo) -> PairReport:
    """One pair in this process (--in-process); Ctrl-C keeps the stages it finished, as in a child."""
    done = PairReport(pair.name, [], {}, {})
    try:
        return verify_pair(pair, options, collecting(
            done, lambda model, stage, seconds, produced: echo(format_progress(model, stage, seconds, produced))))
    except KeyboardInterrupt:
        raise PairInterrupted(_stopped_report(pair, options, done)) from None


def run_suite(config: RunConfig, echo: Echo, options: RunOptions | None = None,
              extra_pairs: dict[str, ModelPair] | None = None) -> dict:
    """Every selected pair, `jobs` at a time (auto_jobs); the reports are rewritten atomically after each one.
    Names that match no pair get an error record and the others still run. `options` replaces what the configuration would
    open; `extra_pairs` join the discovered ones (pairs made in memory run in-process only)."""
    found, broken = scan(tuple(Path(d) for d in config.models_dirs))
    known = {**found, **(extra_pairs or {})}
    # Isolated pairs run their checks in their children: the parent never imports torch for them.
    options = options or RunOptions.open(config, () if config.isolate else verify_checks(config))
    options.gates.require_models([*known, *broken])
    pairs, unknown = select(known, list(config.models) if config.models else None, config.suite, broken)
    pairs, narrowed = narrow(config, pairs, known)
    for line in narrowed.get("said", []):
        echo(line)
    out = Path(config.out or "reports/latest")
    jobs = min(config.jobs or auto_jobs(pairs), max(len(pairs), 1)) if config.isolate else 1
    threads = torch_threads(config.jobs or auto_jobs(pairs)) if config.isolate else None
    run = run_metadata(jobs=jobs, **({"torch_threads": threads} if threads else {}), gates=options.gates.path, quant=list(config.quant) if config.quant is not None else "default",
                       models=[p.name for p in pairs] + unknown,
                       cache=display_path(config.cache_dir) if config.shared_cache else "private to the run (--no-cache)",
                       harness=harness_commit(), gates_sha256=gates_digest(config.gates),
                       **{k: v for k, v in narrowed.items() if k != "said"})
    unknown_records = [CheckResult(name, stages.HF, stages.STAGE_RUN, ERROR,
                                   message=unknown_model_message(name, known, broken)) for name in unknown]
    done: dict[str, PairReport] = {}

    def document_with(status: str) -> dict:
        """The reports as they stand, pairs in the selection's order: every pair not yet run has a not-run
        record, so no partial report reads PASS."""
        waiting = [CheckResult(p.name, stages.HF, stages.STAGE_RUN, NOT_RUN,
                               message="not run: the run " + ("stopped before this pair" if status == INTERRUPTED
                                                              else "has not reached this pair yet"))
                   for p in pairs if p.name not in done]
        finished = [p for p in pairs if p.name in done]
        models = {p.name: {"description": p.description, "features": list(p.features),
                           "expected_failures": [dataclasses.asdict(d) for d in declared_defects(p) if d in p.expected_failures
                                                 or any(r.stage == d.stage for r in done[p.name].results)],
                           "timings": done[p.name].timings, "notes": done[p.name].notes} for p in finished}
        results = unknown_records + [r for p in finished for r in done[p.name].results]
        return report.parity_document({**run, "status": status}, results + waiting, models)

    def finish(pair: ModelPair, rep: PairReport) -> None:
        done[pair.name] = rep
        report.write_reports(out, document_with(RUNNING))

    def run_one(pair: ModelPair) -> PairReport:
        return run_isolated(config, pair, options, echo) if config.isolate else run_in_process(pair, options, echo)

    report.write_reports(out, document_with(RUNNING))
    # A private cache (--no-cache) is removed with the run; isolated pairs fork from one server that
    # imported the libraries once.
    with options.cache, (children_threads(threads) if threads else contextlib.nullcontext()), (
            child.forking() if config.isolate and len(pairs) > 1 else contextlib.nullcontext()):
        stopped = (run_in_turn if jobs == 1 else functools.partial(run_side_by_side, jobs=jobs))(pairs, run_one, finish)
    if stopped:
        document = document_with(INTERRUPTED)
        document["run"]["stopped"] = (f"Interrupted (Ctrl-C) during {', '.join(stopped)}: the stages and pairs "
                                      "that finished are kept; the rest did not run.")
    else:
        document = document_with(COMPLETE)
    report.write_reports(out, document, final=True, figures=options.cache if options.cache.shared else None)
    return document


def auto_jobs(pairs: list[ModelPair]) -> int:
    """Pairs run at once when --jobs is not given: one per core, at most 2 (a tiny pair's child peaks at ~1 GiB),
    and 1 when a pair outside the default suite (a real model, GiBs) is selected."""
    if any(DEFAULT_SUITE not in p.suites for p in pairs):
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def torch_threads(jobs: int) -> int:
    """torch's threads in each pair's child: the cores shared by the pairs the run may hold at once (-j, not how
    many it selected, so one pair's records do not depend on the company it runs in). Two pairs at two threads
    each on two cores oversubscribe them: the default suite warm took 107-111 s that way and 56-62 s at one thread
    each, back to back (2-core Xeon), with the same verdicts (10 of 318 records moved in their 7th digit: float sums).
    An OMP_NUM_THREADS already set wins."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:  # set by the user (or the test workers): theirs
        return int(given)
    return max(1, (os.cpu_count() or 1) // jobs)


@contextlib.contextmanager
def children_threads(threads: int):
    """OMP_NUM_THREADS for the children started inside (the fork server imports torch under it): set before
    torch starts, not by torch.set_num_threads in a forked child, where a Ctrl-C then sometimes ended in SIGSEGV."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def run_in_turn(pairs: list[ModelPair], run_one: Callable[[ModelPair], PairReport],
                finish: Callable[[ModelPair, PairReport], None]) -> list[str]:
    """One pair after another; Ctrl-C keeps what finished and stops: returns the pair it stopped in, if any."""
    for pair in pairs:
        try:
            finish(pair, run_one(pair))
        except PairInterrupted as stop:
            finish(pair, stop.report)
            return [pair.name]
    return []


def run_side_by_side(pairs: list[ModelPair], run_one: Callable[[ModelPair], PairReport],
                     finish: Callable[[ModelPair, PairReport], None], jobs: int) -> list[str]:
    """`jobs` pairs at a time, each in its own child; reports are written as each finishes. Ctrl-C (or a child
    stopped by it) stops every running child, keeping what each finished, and starts no other pair: returns
    the pairs it stopped in."""
    stopped: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="edge-parity-pair") as pool:
        futures = {pool.submit(run_one, pair): pair for pair in pairs}
        collected: set = set()

        def collect(future) -> None:
            try:
                finish(futures[future], future.result())
            except PairInterrupted as stop:
                finish(futures[future], stop.report)
                if futures[future].name not in stopped:
                    stopped.append(futures[future].name)
            collected.add(future)

        interrupted = False
        try:
            for future in concurrent.futures.as_completed(futures):
                collect(future)
                if stopped:  # a child stopped by a Ctrl-C that reached it alone: stop the others too
                    break
        except KeyboardInterrupt:
            interrupted = True
        if stopped or interrupted:
            for future in futures:
                future.cancel()
            child.stop_running()
            concurrent.futures.wait(futures)
            for future in futures:
                if future not in collected and not future.cancelled():
                    collect(future)
    return stopped


def gates_digest(path: str) -> str | None:
    """sha256 of the gates file: shards merge only when they were judged by the same one."""
    from harness.cache import file_digest

    try:
        return file_digest(Path(path))
    except OSError:
        return None


def narrow(config: RunConfig, pairs: list[ModelPair], known: dict[str, ModelPair] | None = None
           ) -> tuple[list[ModelPair], dict]:
    """--changed-since and --shard: the pairs this run keeps, and what its metadata says about the others
    ("said": the lines to print before the run). A touched pair of `known` that the run's suite does not hold
    (the real model, in a default run) is named as not verified, never passed over in silence."""
    note: dict = {"said": []}
    if config.changed_since:
        from harness.affected import affected, describe_skipped, outside_suite, verify_command

        names = [p.name for p in pairs]
        others = [] if config.models else [n for n in known or {} if n not in names]
        touched = affected(config.changed_since, names + others)
        left = outside_suite(touched, config.suite, {n: p.suites for n, p in (known or {}).items()})
        touched = {n: why for n, why in touched.items() if n not in left}
        skipped = [p.name for p in pairs if p.name not in touched]
        note["changed_since"] = {"base": config.changed_since, "affected": touched, "skipped": skipped,
                                 "not_in_suite": left}
        note["said"] += [f"{name}: runs, touched by {'; '.join(why)}" for name, why in touched.items()]
        note["said"] += [f"{name}: NOT VERIFIED by this run, touched by {'; '.join(why)}, but suite {config.suite} "
                         f"does not hold it; verify it with `{verify_command(name)}`"
                         for name, why in left.items()]
        note["said"].append(describe_skipped(config.changed_since, skipped))
        pairs = [p for p in pairs if p.name in touched]
    if config.shard:
        from harness.shards import assign, pair_costs, parse_shard

        index, count = parse_shard(config.shard)
        share = assign([p.name for p in pairs], count, pair_costs())[index - 1]
        note["shard"] = config.shard
        note["shard_of"] = [p.name for p in pairs]  # the selection split, in its order: what merge restores
        note["said"].append(f"shard {config.shard}: {', '.join(share) or 'no pair'} of {len(pairs)} selected")
        pairs = [p for p in pairs if p.name in share]
    return pairs, note


def format_progress(model: str, stage: str, seconds: float, produced: list[CheckResult]) -> str:
    checks = ", ".join(f"{r.check} {r.status}" for r in produced)
    worst = next((r.message for r in produced if r.message and r.status != "pass"), "")
    return f"[{model}] {stage:<24} {seconds:6.1f}s  {checks}" + (f"  -- {worst[:200]}" if worst else "")
