"""The command line: parses arguments, calls the library, prints, maps errors to exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness import pairs as pairs_lib
from harness import report, stages
from harness.cache import DEFAULT_ROOT, ArtifactCache
from harness.errors import HarnessError
from harness.gates import DEFAULT_GATES_PATH, load_gates
from harness.pipeline import RunOptions, verify_pair
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="run model pairs through every stage and gate them")
    verify.add_argument("--models", type=_list_arg, default=None, help="comma list of pair names")
    verify.add_argument("--suite", default="default", choices=["default", "full"])
    verify.add_argument("--out", default="reports/latest", help="report directory")
    verify.add_argument("--in-process", action="store_true", help="no child process per pair (for debugging)")
    _common(verify)
    lst = sub.add_parser("list", help="model pairs, stages and quant recipes known")
    lst.add_argument("--models-dir", action="append", default=[])
    one = sub.add_parser("_verify-one", help=argparse.SUPPRESS)
    one.add_argument("model")
    one.add_argument("--result", required=True)
    _common(one)
    return parser


def cmd_list(args) -> int:
    pairs = pairs_lib.discover(tuple(Path(d) for d in args.models_dir))
    rows = [[p.name, p.hf_class, ", ".join(p.features), ",".join(p.suites),
             ", ".join(r + ("*" if r in p.default_quant else "") for r in p.quant_recipes),
             p.expected_failure or ""] for p in pairs.values()]
    from tabulate import tabulate

    print(tabulate(rows, headers=["pair", "HF reference", "features", "suites", "quant recipes (* default)",
                                  "expected failure"]))
    print()
    print("stages:", ", ".join(stages.FLOAT_STAGES), "+ tflite_<recipe> per quant recipe")
    print("checks:", ", ".join([stages.SENSITIVITY, stages.WEIGHT_COVERAGE, stages.LOGITS, stages.GREEDY,
                                stages.QUANT_ACCURACY]))
    print("quant recipes:", ", ".join(stages.QUANT_RECIPES))
    return EXIT_PASS


def _options(args) -> RunOptions:
    quant = parse_quant(args.quant)
    if args.stages:
        known = set(stages.FLOAT_STAGES) | {stages.tflite_stage(r) for r in stages.QUANT_RECIPES}
        unknown = [st for st in args.stages if st not in known]
        if unknown:
            raise HarnessError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return RunOptions(gates=load_gates(Path(args.gates)), cache=ArtifactCache(Path(args.cache_dir), not args.no_cache),
                      quant=quant, num_threads=args.threads, stages=tuple(args.stages) if args.stages else None)


def cmd_verify(args) -> int:
    start = time.perf_counter()
    options = _options(args)
    models_dirs = tuple(Path(d) for d in args.models_dir)
    known = pairs_lib.discover(models_dirs)
    selected, unknown = pairs_lib.select(known, args.models, args.suite)
    for name in unknown:
        print(f"error: {pairs_lib.unknown_model_message(name, known)}", file=sys.stderr)
    request = SuiteRequest(Path(args.out), args.gates, args.cache_dir, not args.no_cache, options.quant,
                           args.threads, tuple(str(d) for d in models_dirs), options.stages)
    document = run_suite(selected, request, options, lambda line: print(line, flush=True), unknown,
                         isolate=not args.in_process,
                         unknown_message=lambda n: pairs_lib.unknown_model_message(n, known))
    print()
    print(report.render_summary(document, fmt="simple"))
    print(f"reports: {Path(args.out) / report.PARITY_JSON}, {Path(args.out) / report.SUMMARY_MD} "
          f"({time.perf_counter() - start:.0f}s)")
    if unknown:
        return EXIT_USAGE
    return EXIT_PASS if report.verdict(document) == "pass" else EXIT_GATE_FAILED


def cmd_verify_one(args) -> int:
    """Child of `verify`: one pair, progress on stdout, the report as JSON in --result."""
    options = _options(args)
    pair = pairs_lib.discover(tuple(Path(d) for d in args.models_dir))[args.model]

    def progress(model, stage, seconds, produced):
        print("[progress] " + format_progress(model, stage, seconds, produced), flush=True)

    rep = verify_pair(pair, options, progress)
    Path(args.result).write_text(json.dumps(report_to_json(rep), default=str))
    return EXIT_PASS


COMMANDS = {"verify": cmd_verify, "list": cmd_list, "_verify-one": cmd_verify_one}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
