"""Stage and check names: constants used by code, JSON, reports and the CLI alike."""

HF = "hf"
REAUTHORED = "reauthored"
EXPORTED = "exported"
STABLEHLO = "stablehlo"
TFLITE_FLOAT = "tflite_float"
TFLITE_PREFIX = "tflite_"

FLOAT_STAGES = (HF, REAUTHORED, EXPORTED, STABLEHLO, TFLITE_FLOAT)

# Checks.
SENSITIVITY = "sensitivity"
WEIGHT_COVERAGE = "weight_coverage"
LOGITS = "logits"
GREEDY = "greedy"
QUANT_ACCURACY = "quant_accuracy"
STAGE = "stage"  # the stage itself could not run
PREFILL_DECODE = "prefill_decode"  # prefix, chunked, causal, padded and repeated runs agree (harness/properties.py)
KV_CACHE = "kv_cache"  # cache contents vs HF, never-read slots, one write per decode, the end of the cache
PROPERTIES = "properties"  # the extra check that measures both, per stage, after every stage has run
GOLDEN = "golden"  # drift from the recorded golden outputs (also the name of the stage that runs it)

# Every recipe litert-torch's converter offers (converter.QuantizationName), minus "none".
QUANT_RECIPES = (
    "dynamic_int8",
    "weight_only_int8",
    "fp16",
    "dynamic_int4_block32",
    "dynamic_int4_block128",
)
DEFAULT_QUANT = ("dynamic_int8",)


def tflite_stage(recipe: str) -> str:
    """Stage name of a quantized flatbuffer, e.g. tflite_dynamic_int8."""
    return f"{TFLITE_PREFIX}{recipe}"


def parent_stage(stage: str) -> str | None:
    """The stage each stage is compared with: the one it was derived from."""
    if stage == HF:
        return None
    if stage == REAUTHORED:
        return HF
    if stage in (EXPORTED, TFLITE_FLOAT):
        return REAUTHORED
    if stage == STABLEHLO:
        return EXPORTED
    return TFLITE_FLOAT
