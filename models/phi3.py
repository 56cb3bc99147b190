"""Phi-3.5 mini architecture: fused QKV and gate/up projections, LongRoPE short factors with attention scaling."""

import functools
import math

from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

_HEAD_DIM = 32
HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=4,
    # LongRoPE as in Phi-3.5 (max / original = 32 there, 4 here). litert-torch implements the
    # short factors only ("up to 4K tokens"), which HF uses while the sequence fits the original
    # length, so the workload stays far below original_max_position_embeddings.
    original_max_position_embeddings=64,
    rope_parameters={
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 64,
        "factor": 4.0,  # max_position_embeddings / original_max_position_embeddings
        # Phi-3.5's short factors run from 1.0 to 2.8 over its 48 frequencies; 16 here, same span.
        "short_factor": [round(1.0 + 1.8 * i / 15, 4) for i in range(_HEAD_DIM // 2)],
        "long_factor": [round(1.0 + 20.0 * i / 15, 4) for i in range(_HEAD_DIM // 2)],
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


EXAMPLE = "litert_torch.generative.examples.phi.phi3"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's Phi-3.5 config, cut to HF_CONFIG's shape, with its LongRoPE short factors."""
    import torch
    from litert_torch.generative.examples.phi import phi3

    rope = HF_CONFIG["rope_parameters"]
    config = shrink_config(phi3.get_model_config(), HF_CONFIG)
    config.build_rope = functools.partial(
        phi3._build_phi3_rope,
        condense_ratio=1,
        dtype=torch.float32,
        device=torch.device("cpu"),
        theta_factors=torch.tensor(rope["short_factor"]),
        scale=math.sqrt(1 + math.log(rope["factor"]) / math.log(rope["original_max_position_embeddings"])),
    )
    return config


PAIR = ModelPair(
    name="phi3",
    description="Phi-3.5 mini (Phi3ForCausalLM) re-authored with litert_torch.generative.examples.phi.phi3",
    features=("fused QKV", "fused gate/up", "LongRoPE (short factors)", "RMSNorm"),
    hf_class="Phi3ForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES", f"{EXAMPLE}:Phi3_5Mini"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
