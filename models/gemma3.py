"""Gemma 3 (1B) text decoder: QK norm, local/global RoPE bases, sliding-window and global layers.

Declares models/_defects.py GELU_TANH_LOWERED_AS_ERF: its stablehlo composite_body record is xfail inside the
measured band; every stage, stablehlo included, gates at full tolerance.
"""

from models._defects import GELU_TANH_LOWERED_AS_ERF, declared
from models._points import QK_NORM_POINTS
from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=1,  # MQA, as in Gemma 3 1B
    head_dim=32,
    query_pre_attn_scalar=32,  # = head_dim, as in Gemma 3 1B
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    # A window of 8 is crossed by every prompt of 12+ tokens and by decoding (24 positions).
    sliding_window=8,
    # Gemma 3 has five local layers per global one; one of each keeps both kinds in two layers.
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    },
    tie_word_embeddings=True,
)

EXAMPLE = "litert_torch.generative.examples.gemma3.decoder"  # litert-torch, imported when a model is built
_ATTN_TYPES = {"sliding_attention": "LOCAL_SLIDING", "full_attention": "GLOBAL"}  # cfg.AttentionType names


def reauthored_config():
    """litert-torch's Gemma 3 1B decoder config, cut to HF_CONFIG's shape, with its layer types and RoPE bases."""
    from litert_torch.generative.examples.gemma3 import decoder
    from litert_torch.generative.layers import model_config as cfg

    config = shrink_config(decoder.get_decoder_config_1b(), HF_CONFIG)
    config.embedding_scale = HF_CONFIG["hidden_size"] ** 0.5
    for block, layer_type in zip(config.block_configs, HF_CONFIG["layer_types"], strict=True):
        block.attn_config.rotary_base = HF_CONFIG["rope_parameters"][layer_type]["rope_theta"]
        block.attn_config.sliding_window_size = HF_CONFIG["sliding_window"]
        block.attn_config.attn_type = cfg.AttentionType[_ATTN_TYPES[layer_type]]
    return config


PAIR = ModelPair(
    name="gemma3",
    description="Gemma 3 1B (Gemma3ForCausalLM) re-authored with litert_torch.generative.examples.gemma3.decoder",
    features=("MQA", "QK norm", "local/global RoPE bases", "sliding window", "pre/post norms", "tied embeddings"),
    hf_class="Gemma3ForCausalLM",
    hf_config=HF_CONFIG,
    # decoder.build_model_1b swallows a KeyError (returns None); the HF layout is TENSOR_NAMES_SEP_QKV.
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES_SEP_QKV", f"{EXAMPLE}:Decoder"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    # composite_body measured 1.21e-3; the band is ~3x either side.
    expected_failures=(declared(GELU_TANH_LOWERED_AS_ERF, max_abs_err=(4e-4, 3.6e-3)),),
    divergence_points=QK_NORM_POINTS,
)
