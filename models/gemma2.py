"""Gemma 2 (2B) architecture: attention and final logit soft-capping, alternating sliding-window and global layers.

Expected failure at stablehlo only: models/_defects.py GELU_TANH_LOWERED_AS_ERF.
"""

from litert_torch.generative.examples.gemma import gemma2
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
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=32,  # = head_dim, as in Gemma 2 2B
    max_position_embeddings=256,
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

_ATTN_TYPES = {"sliding_attention": cfg.AttentionType.LOCAL_SLIDING, "full_attention": cfg.AttentionType.GLOBAL}


def reauthored_config():
    """litert-torch's Gemma 2 2B config, shrunk to the same shape as HF_CONFIG."""
    config = gemma2.get_model_config_2b()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.embedding_scale = HF_CONFIG["hidden_size"] ** 0.5
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    config.final_logit_softcap = HF_CONFIG["final_logit_softcapping"]
    config.final_norm_config.epsilon = HF_CONFIG["rms_norm_eps"]
    config.block_configs = config.block_configs[: config.num_layers]
    for block, layer_type in zip(config.block_configs, HF_CONFIG["layer_types"], strict=True):
        attn = block.attn_config
        attn.num_heads = HF_CONFIG["num_attention_heads"]
        attn.head_dim = HF_CONFIG["head_dim"]
        attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
        attn.rotary_base = HF_CONFIG["rope_theta"]
        attn.logit_softcap = HF_CONFIG["attn_logit_softcapping"]
        attn.sliding_window_size = HF_CONFIG["sliding_window"]
        attn.attn_type = _ATTN_TYPES[layer_type]
        block.ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    # gemma2.build_2b_model swallows a KeyError (returns None); the HF layout is TENSOR_NAMES_SEP_QKV.
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=gemma2.TENSOR_NAMES_SEP_QKV,
        model_class=gemma2.Gemma2,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="gemma2",
    description="Gemma 2 2B (Gemma2ForCausalLM) re-authored with litert_torch.generative.examples.gemma.gemma2",
    features=("GQA", "attention soft-cap", "final logit soft-cap", "alternating sliding window",
              "pre/post norms", "tied embeddings"),
    hf_class="Gemma2ForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    expected_failure=GELU_TANH_LOWERED_AS_ERF,
)
