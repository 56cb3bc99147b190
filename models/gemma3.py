"""Gemma 3 (1B) text decoder: QK norm, local/global RoPE bases, sliding-window and global layers.

Expected failure at stablehlo only: models/_defects.py GELU_TANH_LOWERED_AS_ERF.
"""

from litert_torch.generative.examples.gemma3 import decoder
from litert_torch.generative.layers import model_config as cfg
from litert_torch.generative.utilities import model_builder

from models._defects import GELU_TANH_LOWERED_AS_ERF
from harness.pairs import ExportSettings, ModelPair

HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,  # MQA, as in Gemma 3 1B
    head_dim=32,
    query_pre_attn_scalar=32,  # = head_dim, as in Gemma 3 1B
    max_position_embeddings=256,
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

_ATTN_TYPES = {"sliding_attention": cfg.AttentionType.LOCAL_SLIDING, "full_attention": cfg.AttentionType.GLOBAL}


def reauthored_config():
    """litert-torch's Gemma 3 1B decoder config, shrunk to the same shape as HF_CONFIG."""
    config = decoder.get_decoder_config_1b()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.embedding_scale = HF_CONFIG["hidden_size"] ** 0.5
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    config.final_norm_config.epsilon = HF_CONFIG["rms_norm_eps"]
    config.block_configs = config.block_configs[: config.num_layers]
    for block, layer_type in zip(config.block_configs, HF_CONFIG["layer_types"], strict=True):
        attn = block.attn_config
        attn.num_heads = HF_CONFIG["num_attention_heads"]
        attn.head_dim = HF_CONFIG["head_dim"]
        attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
        attn.rotary_base = HF_CONFIG["rope_parameters"][layer_type]["rope_theta"]
        attn.sliding_window_size = HF_CONFIG["sliding_window"]
        attn.attn_type = _ATTN_TYPES[layer_type]
        block.ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    # decoder.build_model_1b swallows a KeyError (returns None); the HF layout is TENSOR_NAMES_SEP_QKV.
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=decoder.TENSOR_NAMES_SEP_QKV,
        model_class=decoder.Decoder,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="gemma3",
    description="Gemma 3 1B (Gemma3ForCausalLM) re-authored with litert_torch.generative.examples.gemma3.decoder",
    features=("MQA", "QK norm", "local/global RoPE bases", "sliding window", "pre/post norms", "tied embeddings"),
    hf_class="Gemma3ForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    expected_failure=GELU_TANH_LOWERED_AS_ERF,
)
