"""Model pairs as data, and the registry that finds them in models/."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import pkgutil
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError, UnknownModelError
from harness.stages import DEFAULT_QUANT, QUANT_RECIPES


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
    """A known upstream defect: which stages it breaks, in one line, with a minimal reproduction."""

    reason: str
    stages: tuple[str, ...]  # only these stages' failures are expected; every other stage must pass
    reproduction: str = ""

    def __str__(self) -> str:
        return self.reason


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
    # Checks beyond the standard ones, run after every stage: (pair, outputs, options) -> [CheckResult].
    extra_checks: tuple[Callable[..., Any], ...] = ()
    # Extra checks this pair opts out of, by name, each with the reason the report shows.
    skipped_checks: tuple[tuple[str, str], ...] = ()
    suites: tuple[str, ...] = ("default", "full")
    expected_failure: ExpectedFailure | None = None

    def __post_init__(self):
        unknown = set(self.quant_recipes) - set(QUANT_RECIPES)
        if unknown:
            raise HarnessError(
                f"model pair {self.name!r} lists unknown quant recipes {sorted(unknown)}; "
                f"known: {', '.join(QUANT_RECIPES)}"
            )


def _describe(value: Any) -> Any:
    """A stable, JSON-able description of a field, callables by their source."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if callable(value):
        func = getattr(value, "func", value)  # functools.partial
        try:
            source = inspect.getsource(func)
        except (OSError, TypeError):
            source = getattr(func, "__qualname__", repr(func))
        module = inspect.getmodule(func)
        try:
            module_source = inspect.getsource(module) if module else ""
        except (OSError, TypeError):
            module_source = ""
        extra = [repr(getattr(value, "args", ())), repr(getattr(value, "keywords", {}))]
        return {"source": source, "module": hashlib.sha256(module_source.encode()).hexdigest(), "args": extra}
    return value


def fingerprint(pair: ModelPair) -> str:
    """Hash of everything in a pair definition, builders' source included."""
    text = json.dumps(_describe(pair), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


MODELS_PACKAGE = "models"


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"_edge_parity_models.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken pair file must not hide the others
        raise HarnessError(f"model file {path} failed to import: {type(e).__name__}: {e}") from e
    return module


def discover(models_dirs: tuple[Path, ...] = ()) -> dict[str, ModelPair]:
    """All pairs: one `PAIR` per module of the models package, plus any extra directories."""
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
    pairs = {}
    for where, load in modules:
        module = load()
        pair = getattr(module, "PAIR", None)
        if not isinstance(pair, ModelPair):
            raise HarnessError(f"{where} defines no PAIR = ModelPair(...); every model file declares exactly one")
        if pair.name in pairs:
            raise HarnessError(f"two model files declare the pair name {pair.name!r}; names must be unique")
        pairs[pair.name] = pair
    return pairs


def select(pairs: dict[str, ModelPair], names: list[str] | None, suite: str = "default") -> tuple[list[ModelPair], list[str]]:
    """The pairs a run asked for, by name or by suite, and the names that match no pair."""
    if not names:
        return [p for p in pairs.values() if suite in p.suites], []
    return [pairs[n] for n in names if n in pairs], [n for n in names if n not in pairs]


def unknown_model_message(name: str, pairs: dict[str, ModelPair]) -> str:
    return f"unknown model pair {name!r}; known: {', '.join(sorted(pairs))} (see `harness list`)"
