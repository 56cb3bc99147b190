"""Runs one model pair through every stage and every check; a failing stage never stops the others.

Stages are a table (`STAGES`, plus one `recipe_stage` per quant recipe): each names the stage it is
compared with, the stages it needs, and a function from the typed run state to its records. Adding a
stage is one entry and one function. Extra checks (properties, goldens, real text) run after every
stage, by name, over the same state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import tempfile
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from harness import checks, child, stages
from harness.cache import ArtifactCache
from harness.config import RunConfig
from harness.errors import CheckpointError, HarnessError
from harness.gates import Gate, Gates, gate_for, load_gates
from harness.localise import localisable, localise_failures
from harness.memory import current_rss_mb, peak_rss_mb, release_freed
from harness.pairs import ModelPair, resolve
from harness.paths import scrub
from harness.records import ERROR, FAIL, SKIP, CheckResult
from harness.workload import Trajectory


class ExtraCheck(Protocol):
    """A check that runs once every stage has run, over the whole run state (goldens, properties, real text)."""

    name: str  # its timing and progress line go under this name; a pair's skipped_checks name it

    def __call__(self, state: RunState) -> list[CheckResult]: ...


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """A run of pairs in memory: its configuration, the gates and cache it opened, the extra checks."""

    config: RunConfig
    gates: Gates
    cache: ArtifactCache
    extra_checks: tuple[ExtraCheck, ...] = ()

    @classmethod
    def open(cls, config: RunConfig, extra_checks: tuple[ExtraCheck, ...] = ()) -> RunOptions:
        return cls(config, load_gates(Path(config.gates)), ArtifactCache(Path(config.cache_dir), config.shared_cache),
                   extra_checks)

    def derive(self, **changes: Any) -> RunOptions:
        """The same run with some settings changed: configuration fields, or gates, cache, extra_checks."""
        own = {k: changes.pop(k) for k in ("gates", "cache", "extra_checks") if k in changes}
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes), **own)

    @property
    def quant(self) -> tuple[str, ...] | None:
        return self.config.quant

    @property
    def stages(self) -> tuple[str, ...] | None:
        return self.config.stages

    @property
    def num_threads(self) -> int:
        return self.config.num_threads


@dataclasses.dataclass
class RunState:
    """What one pair's run has produced so far: stages extend it, later stages and extra checks read it."""

    pair: ModelPair
    options: RunOptions
    checkpoint: Path | None = None  # the saved HF checkpoint
    trajectories: list[Trajectory] = dataclasses.field(default_factory=list)  # HF's greedy runs
    model: Any = None  # the re-authored torch module
    programs: dict[str, Any] = dataclasses.field(default_factory=dict)  # torch.export programs by signature
    logits: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # stage -> one array per prompt
    runners: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage -> runner later checks may call
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)  # stage -> flatbuffer
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    completed: set[str] = dataclasses.field(default_factory=set)  # stages that ran to their records
    spilled: Path | None = None  # the directory of what is moved out of memory (spilling), while the run is open
    _parked: tuple[weakref.ref, Path] | None = dataclasses.field(default=None, repr=False)  # park_weights' model, file

    @contextlib.contextmanager
    def timed(self, part: str):
        """Adds the block's seconds to notes["seconds"][part]: where a stage's time goes (selfbench reads it)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.notes.setdefault("seconds", {})
            seconds[part] = round(seconds.get(part, 0.0) + time.perf_counter() - start, 3)

    def drop_stage_outputs(self, keep_logits: bool = False) -> None:
        """Drops what the stages made that a pair's own checks (real text: HF and the flatbuffers) do not read: the
        re-authored model, its export programs and the runners over them, and every stage's logits unless kept
        (a golden update reads them after the run). The weights and logits are mapped from files by now
        (park_weights, spill_logits): dropping them drops those mappings and the pages the run's checks read
        through them; before that, on the real Gemma 3 270M, they were most of the 4.4 GiB real text started with."""
        self.model, self.programs = None, {}
        for stage in (stages.REAUTHORED, stages.EXPORTED):
            self.runners.pop(stage, None)
        if not keep_logits:
            self.logits = {}

    @contextlib.contextmanager
    def spilling(self):
        """Where spill_logits and park_weights put what they move out of memory: a directory of the run's own,
        removed when the block ends (what was mapped from its files stays readable)."""
        with tempfile.TemporaryDirectory(prefix="edge-parity-spill-", dir=child.scratch()) as directory:
            self.spilled = Path(directory)
            try:
                yield
            finally:
                self.spilled, self._parked = None, None

    def spill_logits(self) -> None:
        """Moves every stage's logits to disk after each step: a later stage's comparison and later checks
        (localisation, goldens) read them mapped back from the file, the same bits, and what they read is dropped
        by the next call, which maps each file afresh. So no logits are held while a runner is open: on the real
        Gemma 3 270M they are ~0.3 GB a stage (285 positions x 262k vocab), 2.1 GB by --quant all's last runner."""
        if self.spilled is None:
            return
        try:
            self.logits = {stage: [_mapped_copy(array, self.spilled, stage) for array in arrays]
                           for stage, arrays in self.logits.items()}
        except OSError:  # a full disk: held in memory, as before spilling existed
            return

    def park_weights(self) -> None:
        """Maps the re-authored model's weights from a file of the run's own instead of holding them, while steps
        that run flatbuffers do not read them (1.07 GB on the real Gemma 3 270M). Its parameters and buffers keep
        their identity (so its programs and runners still read them): only their data is swapped for the mapped
        copy, the same bits. A step that reads them (a conversion, localisation) pages them back in; parking them
        again maps the file afresh, which drops those pages."""
        import torch

        if self.model is None or self.spilled is None:
            return
        tensors = self.model.state_dict(keep_vars=True)
        try:
            if self._parked is None or self._parked[0]() is not self.model:  # a model put in its place: its own file
                with tempfile.NamedTemporaryFile(dir=self.spilled, prefix="weights.", suffix=".pt", delete=False) as f:
                    self._parked = None  # until the file is whole
                    torch.save({name: tensor.detach() for name, tensor in tensors.items()}, f)
                self._parked = (weakref.ref(self.model), Path(f.name))
            mapped = torch.load(self._parked[1], mmap=True, weights_only=True)
        except OSError:  # a full disk: held in memory, as before parking existed
            return
        for name, tensor in tensors.items():
            tensor.data = mapped[name]

    def gate(self, stage: str, check: str) -> Gate:
        return gate_for(self.options.gates, self.pair, stage, check)

    def run_trajectories(self, stage: str, runner) -> list[np.ndarray]:
        """The runner along every HF trajectory; kept as the stage's runner for later checks."""
        from harness.runners import run_trajectory

        self.runners[stage] = runner
        return [run_trajectory(runner, t) for t in self.trajectories]

    def compare_with_parent(self, stage: str, parent: str, logits: list[np.ndarray]) -> list[CheckResult]:
        return [checks.compare_logits(self.pair.name, stage, logits, self.logits[parent], self.gate(stage, stages.LOGITS),
                                      parent),
                checks.compare_greedy(self.pair.name, stage, logits, self.trajectories, self.gate(stage, stages.GREEDY))]


def _mapped_copy(array: np.ndarray, directory: Path, stem: str) -> np.ndarray:
    """`array` mapped read-only from a file in `directory`: mapped afresh from its own file when it is one already
    (which drops the pages read through the old mapping), else written to a new file, never over one that may be
    mapped. An empty array stays as it is (it cannot be mapped)."""
    if array.size == 0:
        return array
    if isinstance(array, np.memmap) and Path(array.filename).parent == directory:
        mapped = np.load(array.filename, mmap_mode="r")
        if (mapped.shape, mapped.strides, mapped.dtype) == (array.shape, array.strides, array.dtype):
            return mapped
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f"{stem}.", suffix=".npy", delete=False) as f:
        np.save(f, array)
    return np.load(f.name, mmap_mode="r")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage: what it is compared with, the stages it needs, and how it turns the run state into records."""

    name: str
    parent: str | None
    needs: tuple[str, ...]
    run: Callable[[RunState], list[CheckResult]]


# ---------------------------------------------------------------- the stages

def run_hf(state: RunState) -> list[CheckResult]:
    """The reference: its checkpoint, its greedy trajectories and logits, and whether it is sensitive."""
    from harness.checkpoint import reference_checkpoint
    from harness.reference import REFERENCE_FILE, cached_reference

    pair, cache = state.pair, state.options.cache
    with state.timed("checkpoint"):
        state.checkpoint = reference_checkpoint(pair, cache)
    state.notes.setdefault("artifacts", {})["checkpoint"] = _provenance(cache, state.checkpoint)
    with state.timed("hf_reference"):
        entry, reference = cached_reference(cache, pair, state.checkpoint)
    state.notes["artifacts"][stages.HF] = _provenance(cache, entry, REFERENCE_FILE)
    state.trajectories = reference.trajectories
    state.logits[stages.HF] = reference.logits
    return [checks.sensitivity(pair.name, reference.attention_entropy_ratio, state.gate(stages.HF, stages.SENSITIVITY))]


def run_reauthored(state: RunState) -> list[CheckResult]:
    """The litert-torch model loaded from the checkpoint, its weight coverage, and its logits against HF."""
    from harness.checkpoint import build_reauthored
    from harness.runners import ReauthoredRunner

    pair, export = state.pair, state.pair.export
    with state.timed("reauthored_build"):
        state.model, coverage = build_reauthored(pair, state.checkpoint, export.kv_cache_max)
    logits = state.run_trajectories(stages.REAUTHORED, ReauthoredRunner(state.model, export.kv_cache_max))
    state.logits[stages.REAUTHORED] = logits
    return [checks.weight_coverage(pair.name, coverage, state.gate(stages.REAUTHORED, stages.WEIGHT_COVERAGE)),
            *state.compare_with_parent(stages.REAUTHORED, stages.HF, logits)]


def run_exported(state: RunState) -> list[CheckResult]:
    """The torch.export programs of the converter's signatures (through the cache), against the eager model."""
    from harness.convert import export_key
    from harness.lowering import converter_signatures
    from harness.programs import cached_programs
    from harness.runners import ExportedRunner

    pair, export, cache = state.pair, state.pair.export, state.options.cache
    signatures = converter_signatures(state.model, export.prefill_lens, export.kv_cache_max)
    with state.timed("export"):
        entry, state.programs = cached_programs(cache, export_key(pair, state.checkpoint, cache.code_digests()),
                                                signatures)
    state.notes.setdefault("artifacts", {})[stages.EXPORTED] = _provenance(cache, entry)
    runner = ExportedRunner(state.programs, state.model.config, export.prefill_lens, export.kv_cache_max)
    logits = state.logits[stages.EXPORTED] = state.run_trajectories(stages.EXPORTED, runner)
    return state.compare_with_parent(stages.EXPORTED, stages.REAUTHORED, logits)


def run_stablehlo(state: RunState) -> list[CheckResult]:
    """The lowered StableHLO executed by XlaCallModule, composites resolved as the converter reads them, and
    what the composite bodies as lowered would change (composite_body)."""
    from harness.lowering import (StableHLORunner, compiled_executables, custom_calls, fits_inline,
                                  process_xla_directory, share_weights, stage_lowering)
    from harness.runners import signature_for

    process_xla_directory()  # before share_weights: TensorFlow's first variable reads its XLA flags
    pair, export, cache = state.pair, state.pair.export, state.options.cache
    inline = fits_inline(state.model)
    first = state.trajectories[0]
    probe = f"prefill_{signature_for(first.prompt_len, export.prefill_lens)}"
    with state.timed("lowering"):
        entry, (lowered, resolved, bodies) = stage_lowering(cache, pair, state.checkpoint, state.model,
                                                            state.programs, (probe,))
    state.notes.setdefault("artifacts", {})[stages.STABLEHLO] = _provenance(cache, entry)
    state.notes["stablehlo_markers_resolved"] = resolved
    state.notes["stablehlo_weights"] = "inlined as constants" if inline else (
        "function arguments: inlined, the module would pass XlaCallModule's 2 GiB limit")
    left = custom_calls(lowered)
    if left:
        raise HarnessError(f"cannot execute the lowered StableHLO: custom calls with no XLA kernel remain "
                           f"({', '.join(left)}); teach harness/lowering.py to resolve them")
    share_weights([*lowered.values(), *bodies.values()])  # one copy of the weights, not one per module
    with compiled_executables(cache, entry):
        runner = StableHLORunner(lowered, export.prefill_lens, export.kv_cache_max)
        logits = state.logits[stages.STABLEHLO] = state.run_trajectories(stages.STABLEHLO, runner)
        # No later check runs StableHLO again, and a real model's holds a copy of every weight per signature.
        del state.runners[stages.STABLEHLO]
        as_lowered = None
        if resolved["tanh_gelus_from_attribute"]:
            prompt = first.tokens[:first.prompt_len]
            as_lowered, _ = StableHLORunner({**lowered, **bodies}, export.prefill_lens,
                                            export.kv_cache_max).prefill(prompt, runner.empty_kv())
    results = state.compare_with_parent(stages.STABLEHLO, stages.EXPORTED, logits)
    if as_lowered is not None:
        results.append(checks.composite_body(
            pair.name, as_lowered, logits[0][:first.prompt_len], resolved["tanh_gelus_from_attribute"],
            f"{probe} of prompt 0", state.gate(stages.STABLEHLO, stages.COMPOSITE_BODY)))
    return results


def _flatbuffer(state: RunState, stage: str, recipe: str) -> list[np.ndarray]:
    """Converts (or takes from the cache) the flatbuffer of `recipe` and runs it along every trajectory."""
    from harness.convert import convert
    from harness.runners import TFLiteRunner

    export, cache = state.pair.export, state.options.cache
    with state.timed("conversion"):
        path = convert(state.pair, state.model, state.checkpoint, recipe, cache)
    state.artifacts[stage] = path
    state.notes.setdefault("artifacts", {})[stage] = _provenance(cache, path.parent, path.name)
    state.notes[f"{stage}_bytes"] = path.stat().st_size
    state.park_weights()  # while the flatbuffer runs (XNNPack's own copy of the weights is GiBs on a real model)
    runner = TFLiteRunner(path, export.prefill_lens, export.kv_cache_max, state.options.num_threads)
    logits = state.logits[stage] = state.run_trajectories(stage, runner)
    runner.release()  # reopened by a later check that runs it; a real model's holds GiBs
    return logits


def run_tflite_float(state: RunState) -> list[CheckResult]:
    """The float flatbuffer with XNNPack, against the eager re-authored model."""
    from harness.convert import FLOAT

    logits = _flatbuffer(state, stages.TFLITE_FLOAT, FLOAT)
    return state.compare_with_parent(stages.TFLITE_FLOAT, stages.REAUTHORED, logits)


def run_quantized(state: RunState, recipe: str) -> list[CheckResult]:
    """A quantized flatbuffer, held to its recipe's accuracy budget against the float flatbuffer."""
    stage = stages.tflite_stage(recipe)
    logits = _flatbuffer(state, stage, recipe)
    return [checks.quant_accuracy(state.pair.name, stage, logits, state.logits[stages.TFLITE_FLOAT],
                                  state.gate(stage, stages.QUANT_ACCURACY), state.trajectories)]


def run_litertlm(state: RunState, recipe: str | None = None) -> list[CheckResult]:
    """A flatbuffer (transposed KV layout), float or quantized by `recipe`, bundled with the pair's tokenizer
    and HF's start/stop ids and chat template, run by the LiteRT-LM engine: its tokenizer, metadata, prompt
    template, greedy text and text scores. The float bundle is held to HF; a quantized one to the interpreter
    on the same flatbuffer, so a difference is the engine's, not the recipe's (quant_accuracy judges it)."""
    import tempfile

    from harness import bundle
    from harness.convert import FLOAT, convert
    from harness.runners import TFLiteRunner
    from harness.workload import make_prompts

    pair, cache = state.pair, state.options.cache
    stage = stages.litertlm_stage(recipe)
    with state.timed("conversion"):
        flatbuffer = convert(pair, state.model, state.checkpoint, recipe or FLOAT, cache, kv_layout="transposed")
    settings = bundle.hf_settings(pair, state.checkpoint)
    with tempfile.TemporaryDirectory(dir=child.scratch()) as tmp:
        tokenizer_path = bundle.tokenizer_file(pair, state.checkpoint, Path(tmp))
        with state.timed("bundle"):
            path = bundle.build_bundle(flatbuffer, tokenizer_path, settings, cache)
    tokenizer = bundle.hf_tokenizer(pair, state.checkpoint)
    state.artifacts[stage] = path
    state.notes.setdefault("artifacts", {})[stage] = _provenance(cache, path.parent, path.name)
    # A real-text prompt starts with the start token; the engine adds its own, so the text leaves it out.
    prompts = [tokenizer.decode([int(t) for t in p][int(len(p) > 0 and int(p[0]) == settings.start_token_id):])
               for p in make_prompts(pair)]
    scored = bundle.scored_texts(tokenizer, prompts)
    conversation = bundle.CONVERSATION if settings.chat_template else ()
    with state.timed("engine"):
        engine = bundle.run_engine(bundle.EngineJob(str(path), bundle.TOKENIZER_TEXTS, tuple(prompts), scored,
                                                    conversation, pair.workload.new_tokens, state.options.num_threads))
    expected = bundle.hf_expected_metadata(pair, state.checkpoint, tokenizer)
    stops = [s for [s] in expected["stop_token_ids"]]
    if recipe is None:
        reference = bundle.HFReference(pair, state.checkpoint)
    else:
        reference = bundle.RunnerReference(TFLiteRunner(flatbuffer, pair.export.prefill_lens, pair.export.kv_cache_max,
                                                        state.options.num_threads))
    with state.timed("reference"):
        texts = [tokenizer.decode(reference.greedy(
            bundle.with_start(expected["start_token_id"], tokenizer.encode(p, add_special_tokens=False)),
            pair.workload.new_tokens, stops)) for p in prompts]
        scores = [bundle.reference_scores(reference, tokenizer, expected["start_token_id"], context, target)
                  for context, target in scored]
    if recipe is not None:
        reference.runner.release()  # a real model's interpreter holds GiBs of packed weights
    hf_ids = [tokenizer.encode(t, add_special_tokens=False) for t in bundle.TOKENIZER_TEXTS]
    against = "HF" if recipe is None else "the interpreter"
    if conversation:
        template = checks.prompt_template(
            pair.name, stage, list(tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True,
                                                                 tokenize=True, return_dict=False)),
            bundle.with_start(expected["start_token_id"], engine["rendered_ids"]), engine["rendered"],
            state.gate(stage, stages.PROMPT_TEMPLATE))
    else:
        template = CheckResult(pair.name, stage, stages.PROMPT_TEMPLATE, SKIP,
                               message="the pair's tokenizer has no chat template: the bundle carries none")
    return [
        checks.tokenizer_parity(pair.name, stage, bundle.TOKENIZER_TEXTS, hf_ids, [tokenizer.decode(i) for i in hf_ids],
                                engine["tokenized"], engine["detokenized"], state.gate(stage, stages.TOKENIZER)),
        checks.bundle_metadata(pair.name, stage, expected, engine, state.gate(stage, stages.METADATA)),
        template,
        checks.bundle_greedy(pair.name, stage, texts, engine["greedy"], state.gate(stage, stages.GREEDY_TEXT), against),
        checks.bundle_score(pair.name, stage, scored, scores, engine["token_scores"], state.gate(stage, stages.SCORE),
                            against),
    ]


STAGES = (
    StageSpec(stages.HF, None, (), run_hf),
    StageSpec(stages.REAUTHORED, stages.HF, (stages.HF,), run_reauthored),
    StageSpec(stages.EXPORTED, stages.REAUTHORED, (stages.REAUTHORED,), run_exported),
    StageSpec(stages.STABLEHLO, stages.EXPORTED, (stages.EXPORTED,), run_stablehlo),
    StageSpec(stages.TFLITE_FLOAT, stages.REAUTHORED, (stages.REAUTHORED,), run_tflite_float),
    StageSpec(stages.LITERTLM, stages.HF, (stages.HF, stages.REAUTHORED), run_litertlm),
)


def litertlm_recipe_stage(recipe: str) -> StageSpec:
    """The bundle of a quantized flatbuffer, held to the interpreter on that flatbuffer."""
    return StageSpec(stages.litertlm_stage(recipe), stages.tflite_stage(recipe), (stages.tflite_stage(recipe),),
                     functools.partial(run_litertlm, recipe=recipe))


def recipe_stage(recipe: str) -> StageSpec:
    return StageSpec(stages.tflite_stage(recipe), stages.TFLITE_FLOAT, (stages.TFLITE_FLOAT,),
                     functools.partial(run_quantized, recipe=recipe))


# ---------------------------------------------------------------- planning and running

def asked_recipes(pair: ModelPair, options: RunOptions) -> tuple[str, ...]:
    """The quant recipes a run of `pair` asks for: --quant's, or the pair's defaults."""
    return pair.default_quant if options.quant is None else options.quant


def planned_recipes(pair: ModelPair, options: RunOptions) -> list[str]:
    """The quant recipes a run of `pair` converts: the asked ones whose stage is wanted."""
    return [r for r in asked_recipes(pair, options) if options.config.wants(stages.tflite_stage(r))]


def stage_specs(pair: ModelPair, options: RunOptions) -> dict[str, StageSpec]:
    """Every stage a run of `pair` could go through, by name, in order: the float stages, then a tflite and a
    litertlm stage per asked recipe the pair has."""
    recipes = [r for r in asked_recipes(pair, options) if r in pair.quant_recipes]
    return {spec.name: spec for spec in (*STAGES, *map(recipe_stage, recipes), *map(litertlm_recipe_stage, recipes))}


def left_to_ask(pair: ModelPair, options: RunOptions) -> dict[str, str]:
    """The pair's opt_in_stages a run leaves out, with the reasons: all of them when --stages is not given."""
    return {} if options.stages is not None else dict(pair.opt_in_stages)


def planned_stages(pair: ModelPair, options: RunOptions) -> list[StageSpec]:
    """The stages a run of `pair` goes through, in order: hf and reauthored always, every wanted stage and
    what it needs (a recipe brings tflite_float, stablehlo brings exported); a pair's opt_in_stages only
    when --stages names them."""
    specs, unasked = stage_specs(pair, options), left_to_ask(pair, options)

    def wanted(spec: StageSpec) -> bool:
        return spec.name in (stages.HF, stages.REAUTHORED) or (
            options.config.wants(spec.name) and spec.name not in unasked)

    plan: dict[str, StageSpec] = {}

    def add(spec: StageSpec) -> None:
        for need in spec.needs:
            add(specs[need])
        plan.setdefault(spec.name, spec)

    for spec in specs.values():
        if wanted(spec):
            add(spec)
    order = list(specs)
    return sorted(plan.values(), key=lambda s: order.index(s.name))


@dataclasses.dataclass
class PairReport:
    model: str
    results: list[CheckResult]
    timings: dict[str, float]
    notes: dict[str, Any]
    state: RunState | None = dataclasses.field(default=None, repr=False)  # in memory only


Progress = Callable[[str, str, float, list[CheckResult]], None]


def _run_step(report: PairReport, state: RunState, name: str, needs: tuple[str, ...],
              body: Callable[[], list[CheckResult]], progress: Progress | None) -> None:
    """One stage or extra check: skipped when what it needs did not complete; an exception becomes an error."""
    model = report.model
    start = time.perf_counter()
    missing = [n for n in needs if n not in state.completed]
    if missing:
        produced = [CheckResult(model, name, stages.STAGE_RUN, SKIP,
                                message=f"skipped: needs {', '.join(missing)}, which did not run")]
    else:
        try:
            produced = body()
            state.completed.add(name)
        except HarnessError as e:
            check = stages.WEIGHT_COVERAGE if isinstance(e, CheckpointError) else stages.STAGE_RUN
            produced = [CheckResult(model, name, check, ERROR, message=str(e))]
        except Exception as e:  # noqa: BLE001 - one broken stage must not lose the others
            where = traceback.extract_tb(e.__traceback__)[-1]
            produced = [CheckResult(model, name, stages.STAGE_RUN, ERROR,
                                    message=scrub(f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"))]
    report.timings[name] = round(time.perf_counter() - start, 3)
    release_freed()  # what the step dropped, before the next one allocates
    state.notes.setdefault("peak_rss_mib", {})[name] = round(peak_rss_mb())
    state.notes.setdefault("rss_after_mib", {})[name] = round(current_rss_mb())  # what the step left held
    report.results.extend(produced)
    if progress:
        progress(model, name, report.timings[name], produced)


def unplanned_records(pair: ModelPair, options: RunOptions, planned: set[str]) -> list[CheckResult]:
    """A stage named in --stages that the plan left out: a recipe's stage whose recipe this run does not
    convert is an error (a stage asked for and not run must not read as a pass); one the pair has no such
    recipe for is a skip, said once per recipe with the tflite_<recipe> stage's."""
    out = []
    for name in options.stages or ():
        if name in planned:
            continue
        recipe = name.removeprefix(stages.LITERTLM_PREFIX).removeprefix(stages.TFLITE_PREFIX)
        if recipe not in stages.QUANT_RECIPES:
            continue  # hf and reauthored always run; a float stage named is always planned
        if recipe in planned_recipes(pair, options) and recipe not in pair.quant_recipes:
            if name.startswith(stages.LITERTLM_PREFIX):
                out.append(CheckResult(pair.name, name, stages.STAGE_RUN, SKIP,
                                       message=f"recipe {recipe} does not apply to {pair.name}"))
            continue
        out.append(CheckResult(pair.name, name, stages.STAGE_RUN, ERROR,
                               message=f"--stages names {name}, but this run converts no {recipe} flatbuffer for "
                                       f"{pair.name} (recipes: {', '.join(planned_recipes(pair, options)) or 'none'}); "
                                       f"add --quant {recipe}"))
    return out


def verify_pair(pair: ModelPair, options: RunOptions, progress: Progress | None = None,
                keep_logits: bool = False) -> PairReport:
    """Every planned stage of one pair, compared with the stage it was derived from, then the extra checks.
    `keep_logits`: the report's state keeps every stage's logits, which a pair's own checks run without."""
    state = RunState(pair, options)
    report = PairReport(pair.name, [], {}, state.notes, state)
    skipped = dict(pair.skipped_checks)
    with options.cache.scope() as tally, state.spilling():
        plan = planned_stages(pair, options)
        for spec in plan:
            _run_step(report, state, spec.name, spec.needs, functools.partial(spec.run, state), progress)
            state.spill_logits()
        planned = {spec.name for spec in plan}
        report.results += unplanned_records(pair, options, planned)
        unasked = left_to_ask(pair, options)
        report.results += [CheckResult(pair.name, name, stages.STAGE_RUN, SKIP,
                                       message=f"runs only when named (--stages {name}): {unasked[name]}")
                           for name in stage_specs(pair, options) if name in unasked and name not in planned]
        if any(localisable(r.stage) for r in report.results if r.status == FAIL):  # say where a failure begins
            _run_step(report, state, stages.DIVERGENCE, (), functools.partial(localise_failures, state, report.results),
                      progress)
        for recipe in planned_recipes(pair, options):
            if recipe not in pair.quant_recipes:  # planned by name only; say why it never ran
                report.results.append(CheckResult(pair.name, stages.tflite_stage(recipe), stages.STAGE_RUN, SKIP,
                                                  message=f"recipe {recipe} does not apply to {pair.name}"))
        for check, reason in skipped.items():
            report.results.append(CheckResult(pair.name, check, stages.STAGE_RUN, SKIP,
                                              message=f"skipped for this pair: {reason}"))
        def run_check(extra) -> None:
            if extra.name not in skipped:
                _run_step(report, state, extra.name, (stages.REAUTHORED,), functools.partial(extra, state), progress)

        for extra in options.extra_checks:
            run_check(extra)
        if pair.extra_checks:
            state.drop_stage_outputs(keep_logits)  # nothing from here on reads them
            for extra in map(resolve, pair.extra_checks):
                run_check(extra)
    state.notes["cache"] = tally
    return report


def _provenance(cache: ArtifactCache, entry: Path, file: str | None = None) -> dict[str, Any]:
    """An artifact's cache key and the digest of its file (or of every file of the entry)."""
    key = f"{entry.parent.name}/{entry.name}"
    manifest = cache.served.get(key, {})
    return {"key": key, "sha256": manifest.get(file) if file else dict(sorted(manifest.items()))}
