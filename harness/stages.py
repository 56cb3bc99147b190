"""Stage and check names: constants used by code, JSON, reports and the CLI alike."""

HF = "hf"
REAUTHORED = "reauthored"
EXPORTED = "exported"
STABLEHLO = "stablehlo"
TFLITE_FLOAT = "tflite_float"
TFLITE_PREFIX = "tflite_"
LITERTLM = "litertlm"  # the float flatbuffer bundled with its tokenizer, run by the LiteRT-LM engine
LITERTLM_PREFIX = "litertlm_"  # litertlm_<recipe>: a quantized flatbuffer's bundle

FLOAT_STAGES = (HF, REAUTHORED, EXPORTED, STABLEHLO, TFLITE_FLOAT)

# Checks.
SENSITIVITY = "sensitivity"
WEIGHT_COVERAGE = "weight_coverage"
LOGITS = "logits"
GREEDY = "greedy"
QUANT_ACCURACY = "quant_accuracy"
STAGE_RUN = "stage"  # the record of a stage that could not run (skip or error), not of a check
PREFILL_DECODE = "prefill_decode"  # prefix, chunked, causal, padded and repeated runs agree (harness/property_measures.py)
KV_CACHE = "kv_cache"  # cache contents vs HF, never-read slots, one write per decode, the end of the cache
PROPERTIES = "properties"  # the extra check that measures both, per stage, after every stage has run
GOLDEN = "golden"  # drift from the recorded golden outputs (also the name of the stage that runs it)
DIVERGENCE = "divergence"  # info: the first matched point where a failing stage departs from its parent (harness/localise.py)

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


def litertlm_stage(recipe: str | None) -> str:
    """Stage name of a bundle: litertlm for the float flatbuffer's, litertlm_<recipe> for a quantized one's."""
    return LITERTLM if recipe is None else f"{LITERTLM_PREFIX}{recipe}"


def bundle_stages() -> tuple[str, ...]:
    """Every bundle stage: litertlm and litertlm_<recipe> of every recipe."""
    return tuple(litertlm_stage(r) for r in (None, *QUANT_RECIPES))


def known_stages() -> tuple[str, ...]:
    """Every stage name a run may plan, in pipeline order."""
    return (*FLOAT_STAGES, *(tflite_stage(r) for r in QUANT_RECIPES), *bundle_stages())


def is_quantized(stage: str) -> bool:
    """A tflite_<recipe> stage (tflite_float is not one)."""
    return stage.startswith(TFLITE_PREFIX) and stage != TFLITE_FLOAT


def recipe_of(stage: str) -> str:
    """The quant recipe of a tflite_<recipe> stage."""
    if not is_quantized(stage):
        raise ValueError(f"{stage} is not a quantized stage")
    return stage[len(TFLITE_PREFIX):]


# What the gates file may bound: the metrics each check measures that a `max_`/`min_` key can hold.
COMPOSITE_BODY = "composite_body"  # stablehlo: composite bodies as lowered vs as the converter reads them
PERPLEXITY = "perplexity"  # real text (harness/realtext.py)
GREEDY_TEXT = "greedy_text"
TOKENIZER = "tokenizer"  # litertlm: the engine's tokenize/detokenize against the HF tokenizer
METADATA = "metadata"  # litertlm: the bundle's start/stop ids and context length against HF's
PROMPT_TEMPLATE = "prompt_template"  # litertlm: the engine's chat template against HF's apply_chat_template
SCORE = "score"  # litertlm: the engine's text scoring against the reference's log-probabilities
BENCH = "bench"  # the performance gate's pseudo-stage (harness/bench/)
QUANTIZED_FALLBACK = "tflite_quantized"  # gates for any tflite_<recipe> without a table of its own
GATED_METRICS = {
    SENSITIVITY: ("entropy_ratio",),
    WEIGHT_COVERAGE: ("unused_tensors", "unloaded_params"),
    LOGITS: ("max_abs_err", "mean_abs_err", "min_cosine", "top1"),
    GREEDY: ("match",),
    QUANT_ACCURACY: ("mean_kl", "p99_kl", "max_kl", "top1", "greedy_match_vs_hf"),
    GOLDEN: ("max_abs_err", "max_stats_err", "top1", "greedy_match", "mean_kl", "max_kl", "top5_overlap"),
    COMPOSITE_BODY: ("max_abs_err",),
    DIVERGENCE: ("error",),  # not a gate: max_error is the tolerance each matched point is held to
    PREFILL_DECODE: ("prefix_err", "chunked_err", "signatures_err", "causality_err", "padding_err", "resume_err",
                     "consistency_rel_err", "nondeterministic_values"),
    KV_CACHE: ("sentinel_err", "write_err", "stray_slots", "missed_writes", "reference_err", "reference_rel_err",
               "long_err", "long_mean_kl", "long_max_kl", "overflow_rejected", "consistency_rel_err"),
    PERPLEXITY: ("ppl", "ppl_ratio_vs_hf", "mean_kl", "p99_kl", "max_kl", "top1"),
    GREEDY_TEXT: ("identical",),
    TOKENIZER: ("mismatches",),
    METADATA: ("mismatches",),
    PROMPT_TEMPLATE: ("mismatches",),
    # score_err: the worst |summed log-probability| difference (nats) of a target over its context; token_err:
    # the worst per token; dropped_token_context_err: score_err against the context with its second-to-last
    # token dropped (what litert-lm-api 0.18.1 scores against, harness/bundle.py); token_count_mismatches:
    # targets the engine split into a different number of tokens.
    SCORE: ("score_err", "token_err", "dropped_token_context_err", "token_count_mismatches"),
    "decode_tokens_per_s": ("slowdown",),
    "prefill_tokens_per_s": ("slowdown",),
}
_QUANTIZED_CHECKS = (QUANT_ACCURACY, GOLDEN, PREFILL_DECODE, KV_CACHE, PERPLEXITY, GREEDY_TEXT)
_BUNDLE_CHECKS = (TOKENIZER, METADATA, PROMPT_TEMPLATE, GREEDY_TEXT, SCORE)
CHECKS_AT = {
    HF: (SENSITIVITY, GOLDEN, PERPLEXITY),
    REAUTHORED: (WEIGHT_COVERAGE, LOGITS, GREEDY, GOLDEN, PREFILL_DECODE, KV_CACHE, DIVERGENCE),
    EXPORTED: (LOGITS, GREEDY, GOLDEN, DIVERGENCE),
    STABLEHLO: (LOGITS, GREEDY, GOLDEN, COMPOSITE_BODY, DIVERGENCE),
    TFLITE_FLOAT: (LOGITS, GREEDY, GOLDEN, PREFILL_DECODE, KV_CACHE, PERPLEXITY, GREEDY_TEXT, DIVERGENCE),
    QUANTIZED_FALLBACK: _QUANTIZED_CHECKS,
    **{tflite_stage(r): _QUANTIZED_CHECKS for r in QUANT_RECIPES},
    **{litertlm_stage(r): _BUNDLE_CHECKS for r in (None, *QUANT_RECIPES)},
    BENCH: ("decode_tokens_per_s", "prefill_tokens_per_s"),
}
