"""Model pairs as data, and the registry that finds them in models/."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import sysconfig
import types
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError
from harness.paths import scrub
from harness.stages import CHECKS_AT, DEFAULT_QUANT, GATED_METRICS, QUANT_RECIPES, known_stages

DEFAULT_SUITE, FULL_SUITE = "default", "full"  # the tiny pairs; those and the real model
SUITES = (DEFAULT_SUITE, FULL_SUITE)


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """What shapes the converted flatbuffer is exported with."""

    prefill_lens: tuple[int, ...] = (8, 16)
    kv_cache_max: int = 64


@dataclasses.dataclass(frozen=True)
class Workload:
    """The prompts every stage is run on: lengths of random prompts and tokens generated."""

    prompt_lens: tuple[int, ...] = (5, 12, 16)
    new_tokens: int = 8


@dataclasses.dataclass(frozen=True)
class ExpectedFailure:
    """A known upstream defect, bounded: the one check at one stage it makes fail, and the band its metrics
    fall in when it does. A failure there is xfail only while every violated metric, and every metric the
    band names, lies inside the band; an error, another check, a value outside the band all fail, and so
    does the check passing (the defect no longer shows, so the declaration must go)."""

    name: str
    reason: str
    stage: str
    check: str
    band: dict[str, tuple[float, float]]  # metric -> (low, high), measured with headroom
    reproduction: str = ""

    def __str__(self) -> str:
        return self.reason

    def excuses(self, metric: str, value: Any) -> bool:
        if metric not in self.band or not isinstance(value, (int, float)):
            return False
        low, high = self.band[metric]
        return low <= value <= high

    def describe_band(self) -> str:
        return ", ".join(f"{metric} in [{low:.3g}, {high:.3g}]" for metric, (low, high) in self.band.items())

    def problems(self) -> list[str]:
        """What makes the declaration invalid, in words."""
        if self.stage not in CHECKS_AT:
            return [f"stage {self.stage!r} is not a stage"]
        if self.check not in CHECKS_AT[self.stage]:
            return [f"check {self.check!r} does not run at stage {self.stage}"]
        out = [f"band metric {m!r} is not measured by {self.check}" for m in self.band
               if m not in GATED_METRICS[self.check]]
        out += [f"band of {m} is empty ({lo} > {hi})" for m, (lo, hi) in self.band.items() if lo > hi]
        return out + ([] if self.band else ["the band is empty: say which metric values the defect gives"])


@dataclasses.dataclass(frozen=True)
class DivergencePoint:
    """A matched point a pair adds to those its tensor-name map gives (harness/divergence.py): a module path on
    each side, "{}" standing for the layer index (then one point per layer), recorded right after the point
    `after` ("attention.v" in each layer, or "final_norm"). `take`/`hf_take`: "output", "input" (the
    module's first input) or "heads" (laid out [heads, position, dim], as HF's attention lays out q and k)."""

    name: str  # e.g. "attention.q_norm": layers.<i>.attention.q_norm
    hf: str
    reauthored: str
    after: str
    take: str = "output"
    hf_take: str = "output"


@dataclasses.dataclass(frozen=True)
class ModelPair:
    """An HF reference and its litert-torch re-authored twin.

    `reauthored` has the signature of litert-torch's own example builders:
    (checkpoint_path, custom_loader, mask_cache_size) -> nn.Module, so the weights
    always come from the saved checkpoint through litert-torch's loader.
    """

    name: str
    description: str
    features: tuple[str, ...]
    hf_class: str  # a transformers class name, e.g. "LlamaForCausalLM"
    hf_config: dict[str, Any]  # kwargs of that class's config
    reauthored: Callable[..., Any]
    export: ExportSettings = ExportSettings()
    workload: Workload = Workload()
    quant_recipes: tuple[str, ...] = QUANT_RECIPES
    default_quant: tuple[str, ...] = DEFAULT_QUANT
    seed: int = 0
    # Std of the random init: large enough that attention is far from uniform,
    # so positional and masking defects move the logits well above tolerance.
    init_std: float = 0.15
    # For a real model: builds the float checkpoint dir itself instead of random init.
    checkpoint_builder: Callable[[Path], None] | None = None
    # Checks beyond the standard ones, run after every stage (pipeline.ExtraCheck), or their "module:name".
    extra_checks: tuple[Any, ...] = ()
    # Extra checks this pair opts out of, by name, each with the reason the report shows.
    skipped_checks: tuple[tuple[str, str], ...] = ()
    # Stages this pair runs only when named (--stages), each with the reason a default run reports as a skip:
    # a stage it cannot pass for a reason outside the re-authoring (no stop token to bundle), or one too costly
    # for every run (the real model's bundle).
    opt_in_stages: tuple[tuple[str, str], ...] = ()
    suites: tuple[str, ...] = SUITES
    # Known upstream defects, each bounded to one stage, one check and a band of its metrics.
    expected_failures: tuple[ExpectedFailure, ...] = ()
    # Points the divergence check matches beyond the tensor-name map's (modules the map does not load).
    divergence_points: tuple[DivergencePoint, ...] = ()

    def __post_init__(self):
        for defect in self.expected_failures:
            problems = defect.problems()
            if problems:
                raise HarnessError(f"model pair {self.name!r}: expected failure {defect.name!r}: "
                                   f"{'; '.join(problems)}")
        known = known_stages()
        unknown_stages = [name for name, _ in self.opt_in_stages if name not in known]
        if unknown_stages:
            raise HarnessError(f"model pair {self.name!r}: opt_in_stages names unknown stage(s) "
                               f"{', '.join(unknown_stages)}; known: {', '.join(known)}")
        unknown = set(self.quant_recipes) - set(QUANT_RECIPES)
        if unknown:
            raise HarnessError(
                f"model pair {self.name!r} lists unknown quant recipes {sorted(unknown)}; "
                f"known: {', '.join(QUANT_RECIPES)}"
            )


def declared_defects(pair: ModelPair) -> tuple[ExpectedFailure, ...]:
    """The upstream defects that may excuse a failure of `pair`: its own declarations, then the engine's
    (harness/bundle.py, every pair's bundle) at any stage and check the pair declares nothing for."""
    from harness.bundle import engine_defects

    mine = tuple(getattr(pair, "expected_failures", ()))
    own = {(d.stage, d.check) for d in mine}
    return mine + tuple(d for d in engine_defects() if (d.stage, d.check) not in own)


def resolve(reference: Any) -> Any:
    """An object named "package.module:attribute" (or a module, "package.module"), imported now; anything
    else as it is. Pair files name litert-torch's code this way, so listing pairs imports none of it."""
    if not isinstance(reference, str):
        return reference
    module, _, attribute = reference.partition(":")
    imported = importlib.import_module(module)
    return getattr(imported, attribute) if attribute else imported


_LIBRARY_DIRS = tuple(sorted({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}))


# Code of this project, described by its source wherever it is installed (editable or not).
PROJECT_PACKAGES = ("harness", "models", "tests", "_edge_parity_models")


def _is_library(obj: Any) -> bool:
    """Installed packages and the standard library: their versions (or code digests), part of every key,
    stand for their code."""
    if (getattr(obj, "__module__", None) or "").split(".")[0] in PROJECT_PACKAGES:
        return False
    try:
        path = inspect.getsourcefile(obj) or ""
    except TypeError:  # builtins
        return True
    return not path or path.startswith(_LIBRARY_DIRS)


def _names_read(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_read(const)
    return names


def _describe_callable(value: Any, seen: set[int]) -> Any:
    """Project code by its source and what it reads, recursively; library code by its name.

    Only what a function reads counts, so editing a docstring or another function of the
    same file leaves the key alone, while editing HF_CONFIG or a helper it calls does not.
    """
    if isinstance(value, functools.partial):
        return {"partial": describe(value.func, seen), "args": [describe(a, seen) for a in value.args],
                "keywords": {k: describe(v, seen) for k, v in sorted(value.keywords.items())}}
    name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    if _is_library(value) or id(value) in seen:
        return name
    seen.add(id(value))
    try:
        source = inspect.getsource(value)
    except (OSError, TypeError):
        return name
    code = getattr(value, "__code__", None)
    if code is None:  # a class: its source
        return {"name": name, "source": source}
    namespace = getattr(value, "__globals__", {})
    reads = {n: describe(namespace[n], seen) for n in sorted(_names_read(code))
             if n in namespace and not inspect.ismodule(namespace[n])}
    for n, cell in zip(code.co_freevars, value.__closure__ or ()):
        try:
            reads[n] = describe(cell.cell_contents, seen)
        except ValueError:  # a cell not filled yet
            reads[n] = None
    return {"name": name, "source": source, "reads": reads}


def describe(value: Any, seen: set[int] | None = None) -> Any:
    """A stable, JSON-able description of a field, callables by their source and what it reads. A path of this
    machine (a value the described code reads, such as where the libraries are installed) is shown by its label,
    so a key is the same in every checkout and environment."""
    seen = set() if seen is None else seen
    if isinstance(value, (str, os.PathLike)):
        return scrub(os.fspath(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name), seen) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): describe(v, seen) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [describe(v, seen) for v in value]
    if callable(value):
        return _describe_callable(value, seen)
    return value


def fingerprint(pair: ModelPair) -> str:
    """Hash of everything in a pair definition that shapes what it computes, builders' source included (the
    golden's provenance): the points the divergence check matches shape nothing, so they are left out."""
    described = describe(pair)
    described.pop("divergence_points")
    text = json.dumps(described, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


MODELS_PACKAGE = "models"


@dataclasses.dataclass(frozen=True)
class BrokenPairFile:
    """A pair file that failed to load: reported (list, an error record in a run), never hiding the others."""

    name: str  # the file's stem: the name a run would ask for
    where: str
    error: str

    def message(self) -> str:
        return f"pair file {self.where} is broken: {self.error}; fix it (the other pairs still run)"


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_edge_parity_models.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scan(models_dirs: tuple[Path, ...] = ()) -> tuple[dict[str, ModelPair], dict[str, BrokenPairFile]]:
    """All pairs (one `PAIR` per module of the models package, plus any extra directories), and the files that
    failed to load: a broken file must not hide the others."""
    modules = []
    package = importlib.import_module(MODELS_PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            modules.append((f"{MODELS_PACKAGE}/{info.name}.py",
                            lambda n=info.name: importlib.import_module(f"{MODELS_PACKAGE}.{n}")))
    for directory in models_dirs:
        if not Path(directory).is_dir():
            raise HarnessError(f"models directory {directory} does not exist; pass a folder of pair files")
        for path in sorted(Path(directory).glob("*.py")):
            if not path.name.startswith("_"):
                modules.append((str(path), lambda p=path: _load_file(p)))
    pairs, broken = {}, {}
    for where, load in modules:
        stem = Path(where).stem
        try:
            pair = getattr(load(), "PAIR", None)
        except Exception as e:  # noqa: BLE001 - whatever a pair file raises, it is that file's problem
            broken[stem] = BrokenPairFile(stem, where, f"{type(e).__name__}: {e}")
            continue
        if not isinstance(pair, ModelPair):
            broken[stem] = BrokenPairFile(stem, where, "it defines no PAIR = ModelPair(...); every model file "
                                                       "declares exactly one")
            continue
        if pair.name in pairs:
            raise HarnessError(f"two model files declare the pair name {pair.name!r}; names must be unique")
        pairs[pair.name] = pair
    return pairs, broken


def discover(models_dirs: tuple[Path, ...] = ()) -> dict[str, ModelPair]:
    """The pairs that load (scan also says which files did not)."""
    return scan(models_dirs)[0]


def select(pairs: dict[str, ModelPair], names: list[str] | None, suite: str = DEFAULT_SUITE,
           broken: dict[str, BrokenPairFile] | None = None) -> tuple[list[ModelPair], list[str]]:
    """The pairs a run asked for, by name or by suite, and the names it cannot run: unknown, or a broken
    file (a suite counts every broken file: nobody can tell which suite it was meant for)."""
    broken = broken or {}
    if not names:
        return [p for p in pairs.values() if suite in p.suites], [n for n in broken if n not in pairs]
    return [pairs[n] for n in names if n in pairs], [n for n in names if n not in pairs]


def unknown_model_message(name: str, pairs: dict[str, ModelPair],
                          broken: dict[str, BrokenPairFile] | None = None) -> str:
    if name in (broken or {}):
        return broken[name].message()
    return f"unknown model pair {name!r}; known: {', '.join(sorted(pairs))} (see `harness list`)"
