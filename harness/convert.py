"""TFLite conversion through litert-torch's converter, cached by everything that shapes the flatbuffer."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

from harness.cache import ArtifactCache, dir_digest
from harness.errors import HarnessError
from harness.lowering import cached_modules, converter_signatures, export_programs, fits_inline
from harness.pairs import ModelPair, describe
from harness.programs import cached_programs

FLOAT = "none"  # litert-torch's name for no quantization
MODEL_FILE = "model.tflite"
TFLITE = "tflite"  # the cache's kind for flatbuffers


def artifact_key(pair: ModelPair, checkpoint: Path, recipe: str, libraries: dict, kv_layout: str = "default") -> dict:
    """Everything that affects a converted artifact (not the pair's prose, workload or checks): the builder,
    the harness's code that loads it, the weights, the export settings, the recipe, the harness's conversion
    code and the libraries' code."""
    from harness.checkpoint import build_reauthored

    return {
        "pair": pair.name,
        "reauthored": describe(pair.reauthored),
        "reauthored_loader": describe(build_reauthored),
        "weights": dir_digest(checkpoint),
        "prefill_lens": list(pair.export.prefill_lens),
        "kv_cache_max": pair.export.kv_cache_max,
        "output_logits_on_prefill": True,
        "recipe": recipe,
        "kv_layout": kv_layout,
        "conversion_code": describe(convert),
        "libraries": libraries,
    }


def export_key(pair: ModelPair, checkpoint: Path, libraries: dict) -> dict:
    """Everything that affects the exported stage's torch.export programs: what shapes the model and its export
    (as for a flatbuffer), the harness's export code and how it saves and loads the programs."""
    from harness import lowering, programs

    key = {k: v for k, v in artifact_key(pair, checkpoint, FLOAT, libraries).items()
           if k not in ("recipe", "conversion_code")}
    return {**key, "export_code": describe([lowering.converter_signatures, lowering.export_programs,
                                            programs.save_programs, programs.load_programs])}


def modules_key(pair: ModelPair, checkpoint: Path, libraries: dict, inline_weights: bool) -> dict:
    """Everything that affects lower_modules' MLIR modules of the exported stage's programs: those programs (as
    cached), the harness's lowering code and whether weights are inlined."""
    from harness import lowering

    return {**export_key(pair, checkpoint, libraries),
            "lowering_code": describe([lowering.lower_modules, lowering.save_lowered, lowering.load_lowered]),
            "inline_weights": inline_weights}


def lowering_key(pair: ModelPair, checkpoint: Path, libraries: dict, inline_weights: bool,
                 bodies_of: tuple[str, ...]) -> dict:
    """Everything that affects the stablehlo stage's modules: the modules it resolves (modules_key), the harness's
    resolution code, and which bodies are kept as lowered."""
    from harness import lowering

    return {"modules": modules_key(pair, checkpoint, libraries, inline_weights),
            "resolution_code": describe([lowering.resolve_modules, lowering.cached_lowering]),
            "bodies_of": list(bodies_of)}


def convert(pair: ModelPair, model, checkpoint: Path, recipe: str, cache: ArtifactCache, quiet: bool = True,
            kv_layout: str = "default") -> Path:
    """The flatbuffer of `model` with prefill_<len> and decode signatures, float or quantized by `recipe`, its KV
    cache in litert-torch's default layout or "transposed" (a bundle's).

    litert-torch's converter exports, lowers and converts the same float module whatever the recipe, and only
    then hands its bytes to ai-edge-quantizer (`exported_programs_to_flatbuffer`). So a quantized flatbuffer is
    made the same way from the cached float one, not by exporting and converting again: byte-identical to
    `convert_to_tflite(quantize=recipe)` (tests/test_convert.py), one conversion per layout instead of one per
    recipe."""
    quantizer = quantizer_recipe(model, recipe)
    if quantizer is None:
        return _converted(pair, model, checkpoint, recipe, cache, quiet, kv_layout)

    def build(out: Path) -> None:
        float_flatbuffer = _converted(pair, model, checkpoint, FLOAT, cache, quiet, kv_layout)
        (out / MODEL_FILE).write_bytes(quantize(float_flatbuffer.read_bytes(), quantizer))

    key = artifact_key(pair, checkpoint, recipe, cache.code_digests(), kv_layout)
    return cache.get_or_build(TFLITE, key, build) / MODEL_FILE


def _converted(pair: ModelPair, model, checkpoint: Path, recipe: str, cache: ArtifactCache, quiet: bool,
               kv_layout: str) -> Path:
    """The flatbuffer litert-torch's convert_to_tflite writes for `recipe`, from the cache or converted.

    convert_to_tflite exports the converter's signatures and hands the programs to exported_programs_to_flatbuffer,
    which runs its FX passes and MLIR lowering on each (exported_program_to_mlir) and converts the merged modules.
    The default layout's programs are the exported stage's (through the cache), and a float flatbuffer's modules
    are the ones the stablehlo stage resolves (cached_modules) wherever that stage inlines weights as the converter
    does: so a cold run exports and lowers each program once. The transposed layout's programs are exported and
    lowered here, as only its flatbuffer reads them. Byte-identical to convert_to_tflite either way
    (tests/test_convert.py)."""
    from litert_torch._convert import core, litert_converter
    from litert_torch.generative.utilities import converter

    def build(out: Path) -> None:
        signatures = converter_signatures(model, pair.export.prefill_lens, pair.export.kv_cache_max, kv_layout)
        libraries = cache.code_digests()
        modules = None
        if kv_layout == "default":
            _, programs = cached_programs(cache, export_key(pair, checkpoint, libraries), signatures)
            if recipe == FLOAT and fits_inline(model):
                _, modules = cached_modules(cache, modules_key(pair, checkpoint, libraries, True), programs,
                                            inline_weights=True)
        else:
            programs = export_programs(signatures)
        sink = io.StringIO()
        redirect = contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()
        with redirect:
            previous = logging.root.level
            logging.root.setLevel(logging.ERROR)
            try:
                if modules is None:  # the converter lowers them, after its FX passes
                    inputs = [core._run_convert_passes(programs[sig.name]) for sig in signatures]
                    lowering = contextlib.nullcontext()
                else:
                    inputs = [programs[sig.name] for sig in signatures]
                    lowering = lowered_before({id(p): modules[sig.name] for p, sig in zip(inputs, signatures)})
                with lowering:
                    exporter = litert_converter.exported_programs_to_flatbuffer(
                        inputs, signatures, quant_config=converter.get_quant_recipe_from_flag(recipe, model.config))
                (out / MODEL_FILE).write_bytes(exporter.to_bytes())
            finally:
                logging.root.setLevel(previous)

    key = artifact_key(pair, checkpoint, recipe, cache.code_digests(), kv_layout)
    return cache.get_or_build(TFLITE, key, build) / MODEL_FILE


@contextlib.contextmanager
def lowered_before(modules_of: dict[int, Any]):
    """Inside the block, litert-torch's exported_program_to_mlir answers each program (by id, in `modules_of`)
    with its module lowered before, parsed into the MLIR context the converter passes: the converter shares that
    context across its programs, where MLIR uniques equal constants (its cross-program constant plugin only saves
    building them again). The converter's FX passes and lowering are what lower_modules ran."""
    from litert_converter.mlir import ir
    from litert_torch import backend
    from litert_torch.backend.export import MlirLowered

    def lowered(program, *, ir_context=None, **_):
        if id(program) not in modules_of or ir_context is None:
            raise HarnessError("litert-torch's converter lowered a program the harness had not lowered, or outside "
                               "its shared MLIR context: its exported_programs_to_flatbuffer changed; see "
                               "harness/convert.py")
        module = modules_of[id(program)]
        with ir_context:
            parsed = ir.Module.parse(module.module_bytecode)
        return MlirLowered(ir_context, parsed, module.state_dict, module.input_signature, module.output_signature)

    original = backend.export.exported_program_to_mlir
    backend.export.exported_program_to_mlir = lowered
    try:
        yield
    finally:
        backend.export.exported_program_to_mlir = original


def quantizer_recipe(model, recipe: str) -> list[dict] | None:
    """The ai-edge-quantizer recipe litert-torch's converter applies to the converted float flatbuffer for
    `recipe` and this model (translate_to_ai_edge_recipe); None for float, or for a recipe it would apply
    while converting (PT2E) rather than after."""
    from litert_torch.generative.utilities import converter
    from litert_torch.quantize import quant_config, translate_recipe

    config = converter.get_quant_recipe_from_flag(recipe, model.config)
    if config is None or config._quantizer_mode != quant_config.QuantConfig._QuantizerMode.AI_EDGE_QUANTIZER:
        return None
    return translate_recipe.translate_to_ai_edge_recipe(config.generative_recipe)


def quantize(float_bytes: bytes, recipe: list[dict]) -> bytes:
    """What litert-torch's converter does to its float bytes for an ai-edge-quantizer recipe (quantize_model)."""
    from litert_torch.quantize import translate_recipe

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
        return bytes(translate_recipe.quantize_model(float_bytes, recipe))


def cached_artifact(pair: ModelPair, checkpoint: Path, recipe: str, cache: ArtifactCache,
                    kv_layout: str = "default") -> Path | None:
    """The flatbuffer `convert` would return, if the cache holds it intact; None when it must be converted."""
    entry = cache.lookup(TFLITE, artifact_key(pair, checkpoint, recipe, cache.code_digests(), kv_layout))
    return entry / MODEL_FILE if entry else None
