"""The command line: parses arguments, calls the library, prints, maps errors to exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from harness import golden
from harness import pairs as pairs_lib
from harness import report, stages
from harness.cache import DEFAULT_ROOT, ArtifactCache
from harness.errors import HarnessError
from harness.gates import DEFAULT_GATES_PATH, load_gates
from harness.pipeline import PairReport, RunOptions, verify_pair
from harness.suite import SuiteRequest, format_progress, report_to_json, run_suite

EXIT_PASS, EXIT_GATE_FAILED, EXIT_USAGE = 0, 1, 2


def _list_arg(value: str) -> list[str]:
    return [v for v in value.replace(" ", "").split(",") if v]


def parse_quant(value: str | None) -> tuple[str, ...] | None:
    """'default' (or absent), 'all', 'none', or a comma list of recipes."""
    if value in (None, "default"):
        return None
    if value == "all":
        return stages.QUANT_RECIPES
    if value == "none":
        return ()
    recipes = tuple(_list_arg(value))
    unknown = [r for r in recipes if r not in stages.QUANT_RECIPES]
    if unknown:
        raise HarnessError(f"unknown quant recipe(s) {', '.join(unknown)}; choose from "
                           f"{', '.join(stages.QUANT_RECIPES)}, 'all' or 'none'")
    return recipes


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gates", default=str(DEFAULT_GATES_PATH), help="gates TOML file")
    parser.add_argument("--cache-dir", default=str(DEFAULT_ROOT), help="artifact cache directory")
    parser.add_argument("--no-cache", action="store_true", help="rebuild checkpoints and conversions")
    parser.add_argument("--quant", default=None, help="'default', 'all', 'none' or a comma list of recipes")
    parser.add_argument("--threads", type=int, default=2, help="interpreter threads")
    parser.add_argument("--models-dir", action="append", default=[], help="extra folder of pair files")
    parser.add_argument("--stages", type=_list_arg, default=None,
                        help="comma list of stages to run (hf and reauthored always run)")


def _golden_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--golden-dir", default=str(golden.DEFAULT_GOLDEN_DIR), help="directory of golden files")
    parser.add_argument("--against", choices=["golden"], default=None,
                        help="release gate: every stage must have a golden and stay within its budget; "
                             "writes release.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="run model pairs through every stage and gate them")
    verify.add_argument("--models", type=_list_arg, default=None, help="comma list of pair names")
    verify.add_argument("--suite", default="default", choices=["default", "full"])
    verify.add_argument("--out", default="reports/latest", help="report directory")
    verify.add_argument("--in-process", action="store_true", help="no child process per pair (for debugging)")
    _common(verify)
    _golden_args(verify)
    lst = sub.add_parser("list", help="model pairs, stages and quant recipes known")
    lst.add_argument("--models-dir", action="append", default=[])
    one = sub.add_parser("_verify-one", help=argparse.SUPPRESS)
    one.add_argument("model")
    one.add_argument("--result", required=True)
    _common(one)
    _golden_args(one)
    gold = sub.add_parser("golden", help="golden outputs: `golden update` re-records them")
    gold_sub = gold.add_subparsers(dest="golden_command", required=True)
    upd = gold_sub.add_parser("update", help="re-record the goldens of the selected pairs; prints what moved")
    upd.add_argument("--models", type=_list_arg, default=None, help="comma list of pair names")
    upd.add_argument("--suite", default="default", choices=["default", "full"])
    upd.add_argument("--golden-dir", default=str(golden.DEFAULT_GOLDEN_DIR), help="directory of golden files")
    upd.add_argument("--force", action="store_true", help="record stages that fail parity (needs --reason)")
    upd.add_argument("--reason", default=None, help="why a failing stage is the new reference (stored)")
    _common(upd)
    _bench_parser(sub)
    return parser


def cmd_list(args) -> int:
    pairs = pairs_lib.discover(tuple(Path(d) for d in args.models_dir))
    rows = [[p.name, p.hf_class, ", ".join(p.features), ",".join(p.suites),
             ", ".join(r + ("*" if r in p.default_quant else "") for r in p.quant_recipes),
             "; ".join(f"{d.name} ({d.stage} {d.check}: {d.describe_band()})" for d in p.expected_failures)]
            for p in pairs.values()]
    from tabulate import tabulate

    print(tabulate(rows, headers=["pair", "HF reference", "features", "suites", "quant recipes (* default)",
                                  "declared upstream defects"]))
    print()
    print("stages:", ", ".join(stages.FLOAT_STAGES), "+ tflite_<recipe> per quant recipe")
    print("checks:", ", ".join([stages.SENSITIVITY, stages.WEIGHT_COVERAGE, stages.LOGITS, stages.GREEDY,
                                stages.QUANT_ACCURACY, stages.GOLDEN]))
    print("quant recipes:", ", ".join(stages.QUANT_RECIPES))
    return EXIT_PASS


def _options(args) -> RunOptions:
    quant = parse_quant(args.quant)
    if args.stages:
        known = set(stages.FLOAT_STAGES) | {stages.tflite_stage(r) for r in stages.QUANT_RECIPES}
        unknown = [st for st in args.stages if st not in known]
        if unknown:
            raise HarnessError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    from harness.properties import property_checks

    return RunOptions(gates=load_gates(Path(args.gates)), cache=ArtifactCache(Path(args.cache_dir), shared=not args.no_cache),
                      quant=quant, num_threads=args.threads, stages=tuple(args.stages) if args.stages else None,
                      extra_checks=(property_checks,))


def _with_golden(options: RunOptions, args) -> RunOptions:
    """Adds the golden check: it runs whenever a pair has a golden (see harness/golden.py)."""
    check = golden.GoldenCheck(Path(args.golden_dir), strict=args.against == "golden")
    return dataclasses.replace(options, extra_checks=tuple(options.extra_checks) + (check,))


def cmd_verify(args) -> int:
    start = time.perf_counter()
    options = _with_golden(_options(args), args)
    models_dirs = tuple(Path(d) for d in args.models_dir)
    known = pairs_lib.discover(models_dirs)
    options.gates.require_models(known)
    selected, unknown = pairs_lib.select(known, args.models, args.suite)
    for name in unknown:
        print(f"error: {pairs_lib.unknown_model_message(name, known)}", file=sys.stderr)
    request = SuiteRequest(Path(args.out), args.gates, args.cache_dir, not args.no_cache, options.quant,
                           args.threads, tuple(str(d) for d in models_dirs), options.stages,
                           golden_dir=args.golden_dir, against=args.against)
    document = run_suite(selected, request, options, lambda line: print(line, flush=True), unknown,
                         isolate=not args.in_process,
                         unknown_message=lambda n: pairs_lib.unknown_model_message(n, known))
    release = golden.write_release(Path(args.out), document) if args.against == "golden" else None
    print()
    print(report.render_summary(document, fmt="simple"))
    if release:
        print(release.read_text())
    print(f"reports: {Path(args.out) / report.PARITY_JSON}, {Path(args.out) / report.SUMMARY_MD}"
          + (f", {release}" if release else "") + f" ({time.perf_counter() - start:.0f}s)")
    if unknown:
        return EXIT_USAGE
    return EXIT_PASS if report.verdict(document) == "pass" else EXIT_GATE_FAILED


def cmd_verify_one(args) -> int:
    """Child of `verify`: one pair, progress on stdout, the report as JSON in --result."""
    options = _with_golden(_options(args), args)
    known = pairs_lib.discover(tuple(Path(d) for d in args.models_dir))
    options.gates.require_models(known)
    pair = known[args.model]

    done: list = []
    timings: dict[str, float] = {}

    def progress(model, stage, seconds, produced):
        print("[progress] " + format_progress(model, stage, seconds, produced), flush=True)
        # Each finished stage is on disk at once: if the process dies later, the parent keeps them.
        done.extend(produced)
        timings[stage] = seconds
        partial = report_to_json(PairReport(pair.name, done, timings, {}))
        report.write_atomic(Path(args.result), json.dumps({**partial, "partial": True}, default=str))

    with options.cache:
        rep = verify_pair(pair, options, progress)
    Path(args.result).write_text(json.dumps(report_to_json(rep), default=str))
    return EXIT_PASS


def cmd_golden(args) -> int:
    """`golden update`: verify each pair in-process, re-record its golden, print what moved."""
    if args.force != bool(args.reason):
        raise HarnessError("--force and --reason go together: --force --reason \"why this output is the new "
                           "reference\" (the reason is stored in the golden's provenance)")
    if args.stages:
        raise HarnessError("golden update records every stage of a pair; drop --stages")
    options = dataclasses.replace(_options(args), extra_checks=())
    golden_dir = Path(args.golden_dir)
    known = pairs_lib.discover(tuple(Path(d) for d in args.models_dir))
    options.gates.require_models(known)
    selected, unknown = pairs_lib.select(known, args.models, args.suite)
    for name in unknown:
        print(f"error: {pairs_lib.unknown_model_message(name, known)}", file=sys.stderr)

    def progress(model, stage, seconds, produced):
        print(format_progress(model, stage, seconds, produced), flush=True)

    outcomes = []
    with options.cache:
        for pair in selected:
            quant = golden.recipes_to_record(pair, golden_dir, options.quant)
            rep = verify_pair(pair, dataclasses.replace(options, quant=quant), progress)
            outcomes.append(golden.update(pair, rep.outputs, rep.results, options.gates, golden_dir, args.reason))
            print(outcomes[-1].diff, flush=True)
    print()
    for o in outcomes:
        print(f"{o.model}: {o.status} ({o.path})")
    for path in golden.stale_files(golden_dir, set(known)):
        print(f"stale: {path} matches no model pair; delete it, or restore the pair")
    if unknown:
        return EXIT_USAGE
    return EXIT_GATE_FAILED if any(o.status == "refused" for o in outcomes) else EXIT_PASS


def _thread_counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in _list_arg(value))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads {value!r}: give a comma list of positive integers, e.g. 1,2,4")
    return counts


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="XNNPack performance of the converted artifacts; gate against a baseline")
    bench.add_argument("--models", type=_list_arg, default=None, help="comma list of pair names")
    bench.add_argument("--suite", default="default", choices=["default", "full"])
    bench.add_argument("--quant", default=None, help="recipes beside float: 'default', 'all', 'none' or a comma list")
    bench.add_argument("--threads", type=_thread_counts, default=(1, 2),
                       help="comma list of thread counts; the gate runs at the first")
    bench.add_argument("--out", default=None,
                       help="report directory (default reports/latest, or reports/bench-self-check with --self-check)")
    bench.add_argument("--baseline", default=None, help="directory written by --save-baseline: gate the artifacts "
                                                        "against it (exit 1 on a slow-down beyond the gates)")
    bench.add_argument("--save-baseline", default=None, help="copy the artifacts and a manifest into this directory")
    bench.add_argument("--gate-only", action="store_true", help="with --baseline: skip the full measurements")
    bench.add_argument("--self-check", type=int, default=0, metavar="N",
                       help="gate the first pair's float artifact against itself N times, and its slower quantized "
                            "(or float) twin against it --detections times; reports false-alarm and detection rates")
    bench.add_argument("--detections", type=int, default=10, metavar="M")
    bench.add_argument("--slower", default=None, metavar="PAIR",
                       help="with --self-check: the slower candidate is this pair's float artifact (e.g. a twin "
                            "with one more layer) instead of the quantized twin")
    bench.add_argument("--rounds", type=int, default=8, help="candidate/baseline run pairs per gate comparison")
    bench.add_argument("--decode-steps", type=int, default=256, help="timed decode steps per measurement")
    bench.add_argument("--no-pytorch", action="store_true", help="skip the re-authored PyTorch comparison")
    bench.add_argument("--gates", default=str(DEFAULT_GATES_PATH), help="gates TOML file")
    bench.add_argument("--cache-dir", default=str(DEFAULT_ROOT), help="artifact cache directory")
    bench.add_argument("--no-cache", action="store_true", help="reconvert the artifacts")
    bench.add_argument("--models-dir", action="append", default=[], help="extra folder of pair files")


def cmd_bench(args) -> int:
    """Measures the selected pairs' artifacts (or self-checks the gate); exit 1 when the gate fails."""
    from harness import bench, bench_report

    known = pairs_lib.discover(tuple(Path(d) for d in args.models_dir))
    selected, unknown = pairs_lib.select(known, args.models, args.suite)
    if unknown:
        raise HarnessError("; ".join(pairs_lib.unknown_model_message(n, known) for n in unknown))
    if not selected:
        raise HarnessError(f"no model pair selected (suite {args.suite!r}); see `harness list`")
    if args.rounds < 2 or args.decode_steps < 1:
        raise HarnessError("--rounds must be at least 2 (an interval needs two rounds) and --decode-steps at least 1")
    gates = load_gates(Path(args.gates))
    gates.require_models(known)
    cache = ArtifactCache(Path(args.cache_dir), shared=not args.no_cache)
    settings = bench.BenchSettings(threads=tuple(args.threads), decode_steps=args.decode_steps, rounds=args.rounds,
                                   cache_dir=str(cache.store), models_dirs=tuple(args.models_dir),
                                   pytorch=not args.no_pytorch)
    quant = parse_quant(args.quant)

    def echo(line: str) -> None:
        print(line, flush=True)

    if args.self_check:
        recipes = quant or selected[0].default_quant
        if not recipes and not args.slower:
            raise HarnessError("--self-check needs a slower twin to detect: pass --quant with one recipe, or --slower")
        if args.slower and args.slower not in known:
            raise HarnessError(pairs_lib.unknown_model_message(args.slower, known))
        out = Path(args.out or "reports/bench-self-check")
        document = bench.run_self_check(selected[0], recipes[0] if recipes else None, cache, settings, gates, out,
                                        args.self_check, args.detections,
                                        known[args.slower] if args.slower else None, echo)
    else:
        if args.gate_only and not args.baseline:
            raise HarnessError("--gate-only needs --baseline DIR (a directory written by --save-baseline)")
        out = Path(args.out or "reports/latest")
        document = bench.run_bench(selected, quant, cache, settings, gates, out,
                                   Path(args.baseline) if args.baseline else None,
                                   Path(args.save_baseline) if args.save_baseline else None, args.gate_only, echo)
    print()
    print(bench_report.render_perf(document))
    print(f"reports: {out / bench_report.PERF_JSON}, {out / bench_report.PERF_MD}")
    return EXIT_GATE_FAILED if document["verdict"] == "fail" else EXIT_PASS


COMMANDS = {"verify": cmd_verify, "bench": cmd_bench, "list": cmd_list, "_verify-one": cmd_verify_one,
            "golden": cmd_golden}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for noisy in ("torchao", "torch.utils._pytree"):  # import-time warnings that say nothing about a run
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
