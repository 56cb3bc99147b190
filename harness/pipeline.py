"""Runs one model pair through every stage and every check; a failing stage never stops the others."""

from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Any, Callable

from harness import checks, stages
from harness.cache import ArtifactCache
from harness.checkpoint import attention_entropy_ratio, build_reauthored, load_hf, reference_checkpoint
from harness.convert import FLOAT, convert
from harness.errors import CheckpointError, HarnessError
from harness.gates import Gate, Gates, gate_for
from harness.lowering import (StableHLORunner, converter_signatures, custom_calls, export_programs, fits_inline,
                              lower_programs)
from harness.memory import peak_rss_mb, release_freed
from harness.pairs import ModelPair
from harness.paths import scrub
from harness.records import ERROR, SKIP, CheckResult
from harness.runners import ExportedRunner, ReauthoredRunner, TFLiteRunner, run_trajectory, signature_for
from harness.workload import greedy_trajectory, make_prompts


@dataclasses.dataclass
class RunOptions:
    gates: Gates
    cache: ArtifactCache
    quant: tuple[str, ...] | None = None  # None: the pair's default recipes
    num_threads: int = 2
    stages: tuple[str, ...] | None = None  # None: all; hf and reauthored always run
    # Extra checks run once every stage has run: (pair, outputs, options) -> results.
    # They see each stage's logits (outputs[stage]) and runner (outputs["runners"][stage]).
    extra_checks: tuple[Callable[..., list[CheckResult]], ...] = ()

    def wants(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages


@dataclasses.dataclass
class PairReport:
    model: str
    results: list[CheckResult]
    timings: dict[str, float]
    notes: dict[str, Any]
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # in memory only


Progress = Callable[[str, str, float, list[CheckResult]], None]


class _Stages:
    """Book-keeping of one pair's run: results, timings, and which stages produced outputs."""

    def __init__(self, pair: ModelPair, options: RunOptions, progress: Progress | None):
        self.pair, self.options, self.progress = pair, options, progress
        self.results: list[CheckResult] = []
        self.timings: dict[str, float] = {}
        self.notes: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {"runners": {}}
        self.enabled: set[str] = set()

    def gate(self, stage: str, check: str) -> Gate:
        return gate_for(self.options.gates, self.pair, stage, check)

    def run(self, stage: str, needs: tuple[str, ...], body: Callable[[], list[CheckResult]]) -> None:
        """Runs a stage body unless what it needs is missing; an exception becomes an error record."""
        if stage not in self.enabled:
            return
        start = time.perf_counter()
        missing = [n for n in needs if n not in self.outputs]
        if missing:
            produced = [CheckResult(self.pair.name, stage, stages.STAGE, SKIP,
                                    message=f"skipped: needs {', '.join(missing)}, which did not run")]
        else:
            try:
                produced = body()
            except HarnessError as e:
                check = stages.WEIGHT_COVERAGE if isinstance(e, CheckpointError) else stages.STAGE
                produced = [CheckResult(self.pair.name, stage, check, ERROR, message=str(e))]
            except Exception as e:  # noqa: BLE001 - one broken stage must not lose the others
                where = traceback.extract_tb(e.__traceback__)[-1]
                produced = [CheckResult(self.pair.name, stage, stages.STAGE, ERROR,
                                        message=scrub(f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"))]
        self.timings[stage] = round(time.perf_counter() - start, 3)
        release_freed()  # what the stage dropped, before the next one allocates
        self.notes.setdefault("peak_rss_mib", {})[stage] = round(peak_rss_mb())
        self.results.extend(produced)
        if self.progress:
            self.progress(self.pair.name, stage, self.timings[stage], produced)

    def compare_float(self, stage: str, logits) -> list[CheckResult]:
        parent = stages.parent_stage(stage)
        return [
            checks.compare_logits(self.pair.name, stage, logits, self.outputs[parent],
                                  self.gate(stage, stages.LOGITS)),
            checks.compare_greedy(self.pair.name, stage, logits, self.outputs["trajectories"],
                                  self.gate(stage, stages.GREEDY)),
        ]

    def run_all(self, stage: str, runner) -> list:
        self.outputs["runners"][stage] = runner
        return [run_trajectory(runner, t) for t in self.outputs["trajectories"]]


def planned_recipes(pair: ModelPair, options: RunOptions) -> list[str]:
    """The quant recipes a run of `pair` converts: the asked ones (or the pair's defaults) whose stage is wanted."""
    return [r for r in (pair.default_quant if options.quant is None else options.quant)
            if options.wants(stages.tflite_stage(r))]


def planned_stages(pair: ModelPair, options: RunOptions) -> list[str]:
    """The stages a run of `pair` goes through, in order (hf and reauthored always; what a wanted stage needs)."""
    recipes = planned_recipes(pair, options)
    wanted = {stages.HF, stages.REAUTHORED} | {st for st in stages.FLOAT_STAGES if options.wants(st)}
    if stages.STABLEHLO in wanted:
        wanted.add(stages.EXPORTED)
    if recipes:
        wanted.add(stages.TFLITE_FLOAT)
    return [st for st in stages.FLOAT_STAGES if st in wanted] + [stages.tflite_stage(r) for r in recipes]


def verify_pair(pair: ModelPair, options: RunOptions, progress: Progress | None = None) -> PairReport:
    """Every stage of one pair, compared with the stage it was derived from, held to the gates."""
    s = _Stages(pair, options, progress)
    hits_before, misses_before = len(options.cache.hits), len(options.cache.misses)
    rebuilt_before = len(options.cache.rebuilt)
    export = pair.export
    name = pair.name

    def hf():
        s.outputs["checkpoint"] = checkpoint = reference_checkpoint(pair, options.cache)
        s.notes.setdefault("artifacts", {})["checkpoint"] = _provenance(options.cache, checkpoint)
        model = load_hf(pair, checkpoint)
        prompts = make_prompts(pair)
        runs = [greedy_trajectory(model, p, pair.workload.new_tokens) for p in prompts]
        s.outputs["trajectories"] = [t for t, _ in runs]
        s.outputs[stages.HF] = [logits for _, logits in runs]
        ratio = attention_entropy_ratio(model, prompts)
        return [checks.sensitivity(name, ratio, s.gate(stages.HF, stages.SENSITIVITY))]

    def reauthored():
        model, coverage = build_reauthored(pair, s.outputs["checkpoint"], export.kv_cache_max)
        s.outputs["model"] = model
        logits = s.run_all(stages.REAUTHORED, ReauthoredRunner(model, export.kv_cache_max))
        s.outputs[stages.REAUTHORED] = logits
        return [checks.weight_coverage(name, coverage, s.gate(stages.REAUTHORED, stages.WEIGHT_COVERAGE))] \
            + s.compare_float(stages.REAUTHORED, logits)

    def exported():
        model = s.outputs["model"]
        programs = export_programs(converter_signatures(model, export.prefill_lens, export.kv_cache_max))
        s.outputs["programs"] = programs
        logits = s.run_all(stages.EXPORTED, ExportedRunner(programs, model.config, export.prefill_lens, export.kv_cache_max))
        s.outputs[stages.EXPORTED] = logits
        return s.compare_float(stages.EXPORTED, logits)

    def stablehlo():
        inline = fits_inline(s.outputs["model"])
        first = s.outputs["trajectories"][0]
        probe = f"prefill_{signature_for(first.prompt_len, export.prefill_lens)}"
        lowered, resolved, bodies = lower_programs(s.outputs["programs"], inline_weights=inline, bodies_of=(probe,))
        s.notes["stablehlo_markers_resolved"] = resolved
        s.notes["stablehlo_weights"] = "inlined as constants" if inline else (
            "function arguments: inlined, the module would pass XlaCallModule's 2 GiB limit")
        left = custom_calls(lowered)
        if left:
            return [CheckResult(name, stages.STABLEHLO, stages.STAGE, ERROR,
                                message=f"cannot execute the lowered StableHLO: custom calls with no XLA kernel "
                                        f"remain ({', '.join(left)}); teach harness/lowering.py to resolve them")]
        runner = StableHLORunner(lowered, export.prefill_lens, export.kv_cache_max)
        logits = s.run_all(stages.STABLEHLO, runner)
        s.outputs[stages.STABLEHLO] = logits
        # No later check runs StableHLO again, and a real model's holds a copy of every weight per signature.
        del s.outputs["runners"][stages.STABLEHLO]
        results = s.compare_float(stages.STABLEHLO, logits)
        if resolved["tanh_gelus_from_attribute"]:
            prompt = first.tokens[:first.prompt_len]
            as_lowered, _ = StableHLORunner({**lowered, **bodies}, export.prefill_lens,
                                            export.kv_cache_max).prefill(prompt, runner.empty_kv())
            results.append(checks.composite_body(
                name, as_lowered, logits[0][:first.prompt_len], resolved["tanh_gelus_from_attribute"],
                f"{probe} of prompt 0", s.gate(stages.STABLEHLO, stages.COMPOSITE_BODY)))
        return results

    def tflite(recipe: str):
        def body():
            path = convert(pair, s.outputs["model"], s.outputs["checkpoint"], recipe, options.cache)
            runner = TFLiteRunner(path, export.prefill_lens, export.kv_cache_max, options.num_threads)
            stage = stages.TFLITE_FLOAT if recipe == FLOAT else stages.tflite_stage(recipe)
            s.outputs.setdefault("artifacts", {})[stage] = path
            s.notes.setdefault("artifacts", {})[stage] = _provenance(options.cache, path.parent, path.name)
            logits = s.run_all(stage, runner)
            runner.release()  # reopened by a later check that runs it; a real model's holds GiBs
            s.outputs[stage] = logits
            s.notes[f"{stage}_bytes"] = path.stat().st_size
            if recipe == FLOAT:
                return s.compare_float(stage, logits)
            return [checks.quant_accuracy(name, stage, logits, s.outputs[stages.TFLITE_FLOAT],
                                          s.gate(stage, stages.QUANT_ACCURACY), s.outputs["trajectories"])]
        return body

    recipes = planned_recipes(pair, options)
    skipped = dict(pair.skipped_checks)
    extras = tuple(e for e in tuple(options.extra_checks) + tuple(pair.extra_checks) if _extra_stage(e) not in skipped)
    s.enabled = set(planned_stages(pair, options)) | {_extra_stage(e) for e in extras}
    s.run(stages.HF, (), hf)
    s.run(stages.REAUTHORED, ("checkpoint", "trajectories"), reauthored)
    s.run(stages.EXPORTED, ("model", stages.REAUTHORED), exported)
    s.run(stages.STABLEHLO, ("programs", stages.EXPORTED, "model"), stablehlo)
    s.run(stages.TFLITE_FLOAT, ("model", stages.REAUTHORED), tflite(FLOAT))
    for recipe in recipes:
        stage = stages.tflite_stage(recipe)
        if recipe not in pair.quant_recipes:
            s.results.append(CheckResult(name, stage, stages.STAGE, SKIP,
                                         message=f"recipe {recipe} does not apply to {name}"))
            continue
        s.run(stage, ("model", stages.TFLITE_FLOAT), tflite(recipe))
    for check, reason in skipped.items():
        s.results.append(CheckResult(name, check, stages.STAGE, SKIP, message=f"skipped for this pair: {reason}"))
    for extra in extras:
        s.run(_extra_stage(extra), (stages.REAUTHORED,),
              lambda extra=extra: extra(pair, s.outputs, options))
    s.notes["cache"] = {"hits": len(options.cache.hits) - hits_before,
                        "misses": len(options.cache.misses) - misses_before,
                        "rebuilt_damaged": len(options.cache.rebuilt) - rebuilt_before}
    return PairReport(name, s.results, s.timings, s.notes, s.outputs)


def _extra_stage(extra) -> str:
    """The name an extra check's timing and progress line go under."""
    return getattr(extra, "stage", None) or getattr(extra, "__name__", type(extra).__name__)


def _provenance(cache: ArtifactCache, entry, file: str | None = None) -> dict[str, Any]:
    """An artifact's cache key and the digest of its file (or of every file of the entry)."""
    manifest = cache.served.get(f"{entry.parent.name}/{entry.name}", {})
    return {"key": f"{entry.parent.name}/{entry.name}",
            "sha256": manifest.get(file) if file else dict(sorted(manifest.items()))}
