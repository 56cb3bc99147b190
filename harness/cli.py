"""The command line: parses arguments into a RunConfig, calls the library, prints, maps errors to exit codes.

Heavy libraries (torch, TensorFlow, litert-torch) are imported by the commands that run models, never
at import: `harness list`, `--help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from harness import config as cfg
from harness import stages
from harness.config import RunConfig
from harness.errors import HarnessError

EXIT_PASS, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _echo(line: str) -> None:
    print(line, flush=True)


DESCRIPTION = """Verifies that an LLM re-authored with litert-torch still behaves like its Hugging Face original
at every step to the device: HF, re-authored PyTorch, torch.export, StableHLO, float and quantized TFLite.
Each model pair goes through every stage; each stage is compared with the one it came from and judged
against the gates file. Start with `harness list`, then `harness verify --models tiny_llama`."""

EXIT_CODES = """exit codes:
  0    every gated check passed
  1    a gate failed, or a stage errored (reports say which and why)
  2    usage or configuration error (said before any work), or a named pair that is unknown or broken
  130  interrupted (Ctrl-C): the stages and pairs that finished are in the reports, marked INTERRUPTED"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=DESCRIPTION, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own log output")
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="run model pairs through every stage and gate them",
                            description="Runs the selected pairs through every stage and gates each check; writes "
                                        "parity.json and summary.md to --out after every pair.",
                            epilog=EXIT_CODES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for group in (cfg.models_group, cfg.gates_group, cfg.cache_group, cfg.quant_group, cfg.threads_group,
                  cfg.stages_group, cfg.golden_group, cfg.output_group, cfg.isolation_group, cfg.selection_group):
        group(verify)
    verify.add_argument("--junit", default=None, metavar="FILE", help="also write JUnit XML: one test case per "
                                                                      "model x stage x check")

    lst = sub.add_parser("list", help="model pairs, stages and quant recipes known")
    lst.add_argument("--models-dir", dest="models_dirs", action="append", default=None)

    gold = sub.add_parser("golden", help="golden outputs: `golden update` re-records them")
    gold_sub = gold.add_subparsers(dest="golden_command", required=True)
    update = gold_sub.add_parser("update", help="re-record the goldens of the selected pairs; prints what moved")
    for group in (cfg.models_group, cfg.gates_group, cfg.cache_group, cfg.quant_group, cfg.threads_group):
        group(update)
    cfg.golden_group(update, release=False)
    update.add_argument("--force", action="store_true", help="record stages that fail parity (needs --reason)")
    update.add_argument("--reason", default=None, help="why a failing stage is the new reference (stored)")

    affected = sub.add_parser("affected", help="the pairs a change since a git ref touches, each with why",
                              description="The pairs whose file, golden or gates changed since the merge base "
                                          "with --base (uncommitted changes included); a change to harness/, "
                                          "pyproject.toml, noxfile.py or the default gates touches every pair, "
                                          "tests and docs none.")
    affected.add_argument("--base", required=True, metavar="REF", help="git ref the change is measured from, "
                                                                       "e.g. origin/main")
    affected.add_argument("--json", action="store_true", help="print {base, pairs, reasons, suite, left_to_nightly} as JSON (for CI)")
    affected.add_argument("--models-dir", dest="models_dirs", action="append", default=None)

    rep = sub.add_parser("report", help="reports: `report merge` joins the reports of shards")
    rep_sub = rep.add_subparsers(dest="report_command", required=True)
    merge = rep_sub.add_parser("merge", help="merge the --out directories of `verify --shard` runs into one report")
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="a shard's report directory (holds parity.json)")
    merge.add_argument("--out", required=True, help="directory of the merged parity.json and summary.md")
    merge.add_argument("--junit", default=None, metavar="FILE", help="also write JUnit XML")
    merge.add_argument("--models-dir", dest="models_dirs", action="append", default=None)
    expl = sub.add_parser("explain", help="where one pair's stage first diverges from its parent: table, curve, "
                                          "reproduction script",
                          description="Runs the pair's stage and its parent on one prompt, compares them at matched "
                                      "intermediate points and prints the error at each and the first past the "
                                      "tolerance; writes a PNG curve of the errors and, when a point diverges, a "
                                      "script reproducing it (repro_<pair>_<stage>.py) to --out.",
                          epilog="exit codes: 0 nothing diverges, 1 a point diverges (a quantized stage: its mean KL "
                                 "is past its budget), 2 usage error",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    for group in (cfg.models_group, cfg.gates_group, cfg.cache_group):
        group(expl)
    cfg.output_group(expl, default="reports/explain")
    expl.add_argument("--stage", default=stages.REAUTHORED, help="the stage to localise (default reauthored); a tflite_<recipe> stage is ranked by the KL each "
                                                                "weight group costs quantized alone")
    expl.add_argument("--prompt", type=int, default=0, help="the workload prompt to run, by index (default 0)")

    bench = sub.add_parser("bench", help="XNNPack performance of the converted artifacts; gate against a baseline")
    for group in (cfg.models_group, cfg.gates_group, cfg.cache_group, cfg.quant_group):
        group(bench)
    cfg.threads_group(bench, default="1,2")
    cfg.output_group(bench, default=None)
    _bench_flags(bench)
    return parser


def _bench_flags(bench: argparse.ArgumentParser) -> None:
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
    bench.add_argument("--no-engine", action="store_true",
                       help="skip the float bundle in the LiteRT-LM engine (measured beside the float flatbuffer)")


def _selected(config: RunConfig):
    """The pairs a configuration selects, the names it cannot run (each said on stderr: unknown, or a broken
    pair file), the pairs found, and every name (broken files included: gates overrides for them stay valid)."""
    from harness.pairs import scan, select, unknown_model_message

    known, broken = scan(tuple(Path(d) for d in config.models_dirs))
    selected, unknown = select(known, list(config.models) if config.models else None, config.suite, broken)
    for name in unknown:
        print(f"error: {unknown_model_message(name, known, broken)}", file=sys.stderr)
    for name, damage in broken.items():
        if name not in unknown:
            print(f"note: {damage.message()}", file=sys.stderr)
    return selected, unknown, known, [*known, *broken]


def cmd_list(args) -> int:
    from tabulate import tabulate

    from harness.pairs import scan

    pairs, broken = scan(tuple(Path(d) for d in args.models_dirs or ()))
    rows = [[p.name, p.hf_class, ", ".join(p.features), ",".join(p.suites),
             ", ".join(r + ("*" if r in p.default_quant else "") for r in p.quant_recipes),
             "; ".join(f"{d.name} ({d.stage} {d.check}: {d.describe_band()})" for d in p.expected_failures)]
            for p in pairs.values()]
    rows += [[b.name, "BROKEN", b.error[:100], "", "", f"fix {b.where}"] for b in broken.values()]
    print(tabulate(rows, headers=["pair", "HF reference", "features", "suites", "quant recipes (* default)",
                                  "declared upstream defects"]))
    print()
    print("stages:", ", ".join(stages.FLOAT_STAGES), "+ tflite_<recipe> per quant recipe",
          f"+ {stages.LITERTLM} and {stages.LITERTLM_PREFIX}<recipe> (bundles in the LiteRT-LM engine)")
    for p in pairs.values():
        by_reason: dict[str, list[str]] = {}
        for stage, reason in p.opt_in_stages:
            by_reason.setdefault(reason, []).append(stage)
        for reason, named in by_reason.items():
            print(f"{p.name} runs {', '.join(named)} only when named in --stages: {reason}")
    from harness.bundle import engine_defects

    for defect in {d.name: d for d in engine_defects()}.values():
        print(f"engine defect, declared at every bundle stage: {defect.name} ({defect.check}: {defect.describe_band()})")
    print("checks:", ", ".join(sorted({c for checks in stages.CHECKS_AT.values() for c in checks})))
    print("quant recipes:", ", ".join(stages.QUANT_RECIPES))
    return EXIT_PASS


def cmd_verify(args) -> int:
    from harness import report, suite

    start = time.perf_counter()
    config = RunConfig.from_cli(args, "verify")
    _, unknown, _, _ = _selected(config)
    document = suite.run_suite(config, _echo)
    out = Path(config.out)
    release = report.write_release(out, document) if config.against == "golden" else None
    print()
    print(report.render_summary(document, fmt="simple"))
    if release:
        print(release.read_text())
    if args.junit:
        from harness import junit

        report.write_report(Path(args.junit), junit.render_junit(document))
    for name in unknown:  # said before the run too, where it may have scrolled away
        print(f"error: {name!r} did not run: unknown, or its pair file is broken (see `harness list`); "
              "the others ran", file=sys.stderr)
    print(f"reports: {out / report.PARITY_JSON}, {out / report.SUMMARY_MD}, {out / 'report.html'}"
          + (f", {release}" if release else "") + f" ({time.perf_counter() - start:.0f}s)")
    verdict = report.overall(document)
    if verdict == "interrupted":
        return EXIT_INTERRUPTED
    if unknown:
        return EXIT_USAGE
    return EXIT_PASS if verdict == "pass" else EXIT_GATE_FAILED


def cmd_golden(args) -> int:
    """`golden update`: verify each pair in-process, re-record its golden, print what moved."""
    from harness import golden
    from harness.paths import display_path
    from harness.pipeline import RunOptions, verify_pair
    from harness.suite import format_progress

    if args.force != bool(args.reason):
        raise HarnessError("--force and --reason go together: --force --reason \"why this output is the new "
                           "reference\" (the reason is stored in the golden's provenance)")
    config = RunConfig.from_cli(args, "golden")
    selected, unknown, _, names = _selected(config)
    options = RunOptions.open(config)
    options.gates.require_models(names)
    golden_dir = Path(config.golden_dir)

    def progress(model, stage, seconds, produced):
        print(format_progress(model, stage, seconds, produced), flush=True)

    outcomes = []
    with options.cache:
        for pair in selected:
            quant = golden.recipes_to_record(pair, golden_dir, config.quant)
            rep = verify_pair(pair, options.derive(quant=quant), progress, keep_logits=True)
            outcomes.append(golden.update(pair, rep.state.logits, rep.state.trajectories, rep.results, options.gates,
                                          golden_dir, args.reason))
            print(outcomes[-1].diff, flush=True)
    print()
    for o in outcomes:
        print(f"{o.model}: {o.status} ({display_path(o.path)})")
    for path in golden.stale_files(golden_dir, set(names)):
        print(f"stale: {display_path(path)} matches no model pair; delete it, or restore the pair")
    if unknown:
        return EXIT_USAGE
    return EXIT_GATE_FAILED if any(o.status == "refused" for o in outcomes) else EXIT_PASS


def cmd_bench(args) -> int:
    """Measures the selected pairs' artifacts (or self-checks the gate); exit 1 when the gate fails."""
    from harness import bench
    from harness.cache import ArtifactCache
    from harness.gates import load_gates

    config = RunConfig.from_cli(args, "bench")
    selected, unknown, known, names = _selected(config)  # as in verify and golden: the others run, exit 2 at the end
    if not selected:
        raise HarnessError(f"no model pair selected (suite {config.suite!r}); see `harness list`")
    if args.rounds < 2 or args.decode_steps < 1:
        raise HarnessError("--rounds must be at least 2 (an interval needs two rounds) and --decode-steps at least 1")
    if args.gate_only and not args.baseline:
        raise HarnessError("--gate-only needs --baseline DIR (a directory written by --save-baseline)")
    if args.slower and args.slower not in known:
        raise HarnessError(f"--slower {args.slower}: no such model pair; see `harness list`")
    gates = load_gates(Path(config.gates))
    gates.require_models(names)
    with ArtifactCache(Path(config.cache_dir), shared=config.shared_cache) as cache:
        settings = bench.BenchSettings(threads=config.threads, decode_steps=args.decode_steps, rounds=args.rounds,
                                       cache_dir=str(cache.store), models_dirs=config.models_dirs,
                                       pytorch=not args.no_pytorch, engine=not args.no_engine)
        if args.self_check:
            recipes = config.quant or selected[0].default_quant
            if not recipes and not args.slower:
                raise HarnessError("--self-check needs a slower twin to detect: pass --quant with one recipe, "
                                   "or --slower")
            out = Path(config.out or "reports/bench-self-check")
            document = bench.run_self_check(selected[0], recipes[0] if recipes else None, cache, settings, gates, out,
                                            args.self_check, args.detections,
                                            known[args.slower] if args.slower else None, _echo)
        else:
            out = Path(config.out or "reports/latest")
            document = bench.run_bench(selected, config.quant, cache, settings, gates, out,
                                       Path(args.baseline) if args.baseline else None,
                                       Path(args.save_baseline) if args.save_baseline else None, args.gate_only,
                                       _echo)
    print()
    print(bench.render_perf(document))
    print(f"reports: {out / bench.PERF_JSON}, {out / bench.PERF_MD}")
    if unknown:
        return EXIT_USAGE
    return EXIT_GATE_FAILED if document["verdict"] == "fail" else EXIT_PASS


def _registry(models_dirs) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Every pair name, broken files' included, in the registry's order (the order a run selects them in), and
    the suites of each pair that loads."""
    from harness.pairs import scan

    known, broken = scan(tuple(Path(d) for d in models_dirs or ()))
    return [*known, *(n for n in broken if n not in known)], {n: p.suites for n, p in known.items()}


def cmd_affected(args) -> int:
    import json

    from harness.affected import plan, touched

    names, suites = _registry(args.models_dirs)
    found = plan(args.base, touched(args.base), names, suites)
    if args.json:
        print(json.dumps(found))
        return EXIT_PASS
    for name, why in found["reasons"].items():
        later = " (left to the nightly full run)" if name in found["left_to_nightly"] else ""
        print(f"{name}: {'; '.join(why)}{later}")
    print(f"suite to verify: {found['suite']}" if found["pairs"] else f"no pair is touched by the change since {args.base}")
    return EXIT_PASS


def cmd_report(args) -> int:
    """`report merge`: the shards' documents as one, written as verify writes its reports."""
    from harness import junit, report, shards
    from harness.cache import ArtifactCache
    from harness.config import default_cache_dir

    out = Path(args.out)
    cfg.check_writable(out)
    document = shards.merge([shards.read_document(Path(d)) for d in args.dirs], _registry(args.models_dirs)[0])
    report.write_reports(out, document, final=True, figures=ArtifactCache(Path(default_cache_dir())))
    if args.junit:
        report.write_report(Path(args.junit), junit.render_junit(document))
    print(report.render_summary(document, fmt="simple"))
    print(f"reports: {out / report.PARITY_JSON}, {out / report.SUMMARY_MD}" + (f", {args.junit}" if args.junit else ""))
    verdict = report.overall(document)
    return EXIT_PASS if verdict == "pass" else EXIT_INTERRUPTED if verdict == "interrupted" else EXIT_GATE_FAILED


def cmd_explain(args) -> int:
    """Localises one pair's stage on one prompt; exit 1 when a point diverges."""
    from harness import explain
    from harness.cache import ArtifactCache
    from harness.gates import load_gates
    from harness.localise import describe
    from harness.paths import display_path

    config = RunConfig.from_cli(args, "explain")
    if not config.models or len(config.models) != 1:
        raise HarnessError("explain localises one pair: pass --models PAIR (see `harness list`)")
    explain.check_stage(args.stage)
    gates = load_gates(Path(config.gates))
    pair = explain.find_pair(config.models[0], config.models_dirs)
    explain.check_prompt(pair, args.prompt)
    # Written inside the cache's block: a --no-cache build's flatbuffer goes with its private cache, so the copy
    # beside the reproduction is made first.
    with ArtifactCache(Path(config.cache_dir), config.shared_cache) as cache:
        result = explain.explain(pair, config.models_dirs, args.stage, args.prompt, gates, cache)
        if result.ranking is not None:  # a quantized stage: which weight groups its cost comes from
            from harness import quant_rank

            print(quant_rank.table(result.ranking))
            print()
            print(quant_rank.describe(result.ranking))
            written = explain.write_explanation(Path(config.out), result)
            print("wrote: " + ", ".join(display_path(p) for p in written))
            over = result.budget is not None and result.ranking.mean_kl > result.budget
            return EXIT_GATE_FAILED if over else EXIT_PASS
        print(explain.table(result.divergence))
        print()
        print(describe(result.divergence))
        written = explain.write_explanation(Path(config.out), result)
    print("wrote: " + ", ".join(display_path(p) for p in written))
    if result.divergence.first:
        print(f"reproduce: python {display_path(written[-1])}")
    return EXIT_GATE_FAILED if result.divergence.first else EXIT_PASS


COMMANDS = {"verify": cmd_verify, "explain": cmd_explain, "affected": cmd_affected, "report": cmd_report,
            "bench": cmd_bench, "list": cmd_list, "golden": cmd_golden}


def _quiet_libraries(verbose: bool) -> None:
    """The libraries' import-time and progress logging says nothing about a run; -v shows it (children too)."""
    if verbose:
        os.environ[cfg.VERBOSE_ENV] = "1"
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for category in (FutureWarning, DeprecationWarning, UserWarning):  # the libraries' own deprecations
        warnings.filterwarnings("ignore", category=category)
    for noisy in ("torchao", "torch.utils._pytree", "absl", "tensorflow", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # verify keeps what finished (harness.suite); elsewhere nothing half-done is kept
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
