"""TFLite conversion through litert-torch's converter, cached by everything that shapes the flatbuffer."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from harness.cache import ArtifactCache, dir_digest
from harness.lowering import export_config
from harness.pairs import ModelPair, describe

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


def lowering_key(pair: ModelPair, checkpoint: Path, libraries: dict, bodies_of: tuple[str, ...]) -> dict:
    """Everything that affects the lowered StableHLO of the stablehlo stage: what shapes the model and its
    export (as for a flatbuffer), the harness's export and lowering code, and which bodies are kept as lowered."""
    from harness import lowering

    key = {k: v for k, v in artifact_key(pair, checkpoint, FLOAT, libraries).items()
           if k not in ("recipe", "conversion_code")}
    return {**key, "export_code": describe([lowering.converter_signatures, lowering.export_programs]),
            "lowering_code": describe([lowering.lower_programs, lowering.save_lowered, lowering.load_lowered]),
            "inline_weights": True, "bodies_of": list(bodies_of)}


def convert(pair: ModelPair, model, checkpoint: Path, recipe: str, cache: ArtifactCache, quiet: bool = True,
            kv_layout: str = "default") -> Path:
    """The flatbuffer of `model` with prefill_<len> and decode signatures, float or quantized by `recipe`, its KV
    cache in litert-torch's default layout or "transposed" (a bundle's)."""
    from litert_torch.generative.utilities import converter

    def build(out: Path) -> None:
        sink = io.StringIO()
        redirect = contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()
        with redirect:
            previous = logging.root.level
            logging.root.setLevel(logging.ERROR)
            try:
                path = converter.convert_to_tflite(
                    model, str(out), "model", list(pair.export.prefill_lens), pair.export.kv_cache_max,
                    quantize=recipe, export_config=export_config(kv_layout),
                )
            finally:
                logging.root.setLevel(previous)
        Path(path).rename(out / MODEL_FILE)

    key = artifact_key(pair, checkpoint, recipe, cache.code_digests(), kv_layout)
    return cache.get_or_build(TFLITE, key, build) / MODEL_FILE


def cached_artifact(pair: ModelPair, checkpoint: Path, recipe: str, cache: ArtifactCache,
                    kv_layout: str = "default") -> Path | None:
    """The flatbuffer `convert` would return, if the cache holds it intact; None when it must be converted."""
    entry = cache.lookup(TFLITE, artifact_key(pair, checkpoint, recipe, cache.code_digests(), kv_layout))
    return entry / MODEL_FILE if entry else None
