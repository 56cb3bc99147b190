"""Phi-2 architecture: partial rotary, parallel attention + MLP, LayerNorm, biases everywhere, GELU (tanh).

Expected failure at stablehlo only: models/_defects.py GELU_TANH_LOWERED_AS_ERF.
"""

from litert_torch.generative.examples.phi import phi2
from litert_torch.generative.utilities import model_builder

from models._defects import GELU_TANH_LOWERED_AS_ERF
from harness.pairs import ExportSettings, ModelPair

HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    partial_rotary_factor=0.4,  # Phi-2's: RoPE on 12 of each head's 32 dims
    rope_theta=10000.0,
    layer_norm_eps=1e-5,
    hidden_act="gelu_new",
    tie_word_embeddings=False,
)


def reauthored_config():
    """litert-torch's Phi-2 config, shrunk to the same shape as HF_CONFIG."""
    config = phi2.get_model_config()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    config.final_norm_config.epsilon = HF_CONFIG["layer_norm_eps"]
    block = config.block_config(0)
    block.pre_attention_norm_config.epsilon = HF_CONFIG["layer_norm_eps"]
    attn = block.attn_config
    attn.num_heads = HF_CONFIG["num_attention_heads"]
    attn.head_dim = HF_CONFIG["hidden_size"] // HF_CONFIG["num_attention_heads"]
    attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
    attn.rotary_base = HF_CONFIG["rope_theta"]
    attn.rotary_percentage = HF_CONFIG["partial_rotary_factor"]
    block.ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=phi2.TENSOR_NAMES,
        model_class=phi2.Phi2,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="phi2",
    description="Phi-2 (PhiForCausalLM) re-authored with litert_torch.generative.examples.phi.phi2",
    features=("partial RoPE", "parallel attention+MLP", "LayerNorm", "biases", "GELU"),
    hf_class="PhiForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    expected_failure=GELU_TANH_LOWERED_AS_ERF,
)
