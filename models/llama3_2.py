"""Llama 3.2 (1B) architecture: llama3 RoPE frequency scaling, GQA, tied embeddings."""

import functools

import torch
from litert_torch.generative.examples.llama import llama
from litert_torch.generative.utilities import model_builder

from harness.pairs import ExportSettings, ModelPair

HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    # Llama 3.2's scaling with original_max_position_embeddings 16 instead of 8192: wavelengths
    # above 16 positions are divided by `factor`, those between 4 and 16 interpolated, so the
    # scaling changes all but the fastest RoPE frequencies within the 24-position workload.
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    tie_word_embeddings=True,
)


def reauthored_config():
    """litert-torch's Llama 3.2 1B config, shrunk to the same shape as HF_CONFIG."""
    rope = HF_CONFIG["rope_parameters"]
    config = llama.get_1b_model_config()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    config.final_norm_config.epsilon = HF_CONFIG["rms_norm_eps"]
    config.build_rope = functools.partial(
        llama._build_llama3_rope_cache,
        condense_ratio=1,
        dtype=torch.float32,
        device=torch.device("cpu"),
        factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        max_seq_len=rope["original_max_position_embeddings"],
    )
    block = config.block_config(0)
    attn = block.attn_config
    attn.num_heads = HF_CONFIG["num_attention_heads"]
    attn.head_dim = HF_CONFIG["head_dim"]
    attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
    attn.rotary_base = rope["rope_theta"]
    block.ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=llama.TENSOR_NAMES,
        model_class=llama.Llama,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="llama3_2",
    description="Llama 3.2 1B (LlamaForCausalLM) re-authored with litert_torch.generative.examples.llama",
    features=("GQA", "llama3 RoPE scaling", "gated MLP", "RMSNorm", "tied embeddings"),
    hf_class="LlamaForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
