"""Llama 3.2 (1B) architecture: llama3 RoPE frequency scaling, GQA, tied embeddings."""

import functools

from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=2,
    head_dim=32,
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


EXAMPLE = "litert_torch.generative.examples.llama.llama"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's Llama 3.2 1B config, cut to HF_CONFIG's shape, with its llama3 RoPE scaling."""
    import torch
    from litert_torch.generative.examples.llama import llama

    rope = HF_CONFIG["rope_parameters"]
    config = shrink_config(llama.get_1b_model_config(), HF_CONFIG)
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
    return config


PAIR = ModelPair(
    name="llama3_2",
    description="Llama 3.2 1B (LlamaForCausalLM) re-authored with litert_torch.generative.examples.llama",
    features=("GQA", "llama3 RoPE scaling", "gated MLP", "RMSNorm", "tied embeddings"),
    hf_class="LlamaForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES", f"{EXAMPLE}:Llama"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
