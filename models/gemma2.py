"""Gemma 2 (2B) architecture: attention and final logit soft-capping, alternating sliding-window and global layers.

Declares models/_defects.py GELU_TANH_LOWERED_AS_ERF: its stablehlo composite_body record is xfail inside the
measured band; every stage, stablehlo included, gates at full tolerance.
"""

from models._defects import GELU_TANH_LOWERED_AS_ERF, declared
from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=32,  # = head_dim, as in Gemma 2 2B
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    # A window of 8 is crossed by every prompt of 12+ tokens and by decoding (24 positions).
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    # Gemma 2's caps are 50 and 30; the tiny model's scores and logits are a few units, so
    # smaller caps keep tanh in its non-linear range where a missing cap shows.
    attn_logit_softcapping=5.0,
    final_logit_softcapping=5.0,
    tie_word_embeddings=True,
)

EXAMPLE = "litert_torch.generative.examples.gemma.gemma2"  # litert-torch, imported when a model is built
_ATTN_TYPES = {"sliding_attention": "LOCAL_SLIDING", "full_attention": "GLOBAL"}  # cfg.AttentionType names


def reauthored_config():
    """litert-torch's Gemma 2 2B config, cut to HF_CONFIG's shape, with its soft-caps and layer types."""
    from litert_torch.generative.examples.gemma import gemma2
    from litert_torch.generative.layers import model_config as cfg

    config = shrink_config(gemma2.get_model_config_2b(), HF_CONFIG)
    config.embedding_scale = HF_CONFIG["hidden_size"] ** 0.5
    config.final_logit_softcap = HF_CONFIG["final_logit_softcapping"]
    for block, layer_type in zip(config.block_configs, HF_CONFIG["layer_types"], strict=True):
        block.attn_config.logit_softcap = HF_CONFIG["attn_logit_softcapping"]
        block.attn_config.sliding_window_size = HF_CONFIG["sliding_window"]
        block.attn_config.attn_type = cfg.AttentionType[_ATTN_TYPES[layer_type]]
    return config


PAIR = ModelPair(
    name="gemma2",
    description="Gemma 2 2B (Gemma2ForCausalLM) re-authored with litert_torch.generative.examples.gemma.gemma2",
    features=("GQA", "attention soft-cap", "final logit soft-cap", "alternating sliding window",
              "pre/post norms", "tied embeddings"),
    hf_class="Gemma2ForCausalLM",
    hf_config=HF_CONFIG,
    # gemma2.build_2b_model swallows a KeyError (returns None); the HF layout is TENSOR_NAMES_SEP_QKV.
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES_SEP_QKV", f"{EXAMPLE}:Gemma2"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    # composite_body measured 3.02e-3; the band is ~3x either side.
    expected_failures=(declared(GELU_TANH_LOWERED_AS_ERF, max_abs_err=(1e-3, 9e-3)),),
)
