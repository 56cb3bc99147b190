"""Phi-2 architecture: partial rotary, parallel attention + MLP, LayerNorm, biases everywhere, GELU (tanh).

Declares models/_defects.py GELU_TANH_LOWERED_AS_ERF: its stablehlo composite_body record is xfail inside the
measured band; every stage, stablehlo included, gates at full tolerance.
"""

from models._defects import GELU_TANH_LOWERED_AS_ERF, declared
from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=4,
    partial_rotary_factor=0.4,  # Phi-2's: RoPE on 12 of each head's 32 dims
    rope_theta=10000.0,
    layer_norm_eps=1e-5,
    hidden_act="gelu_new",
    tie_word_embeddings=False,
)


EXAMPLE = "litert_torch.generative.examples.phi.phi2"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's Phi-2 config, cut to HF_CONFIG's shape, with its partial rotary."""
    from litert_torch.generative.examples.phi import phi2

    config = shrink_config(phi2.get_model_config(), HF_CONFIG)
    config.block_config(0).attn_config.rotary_percentage = HF_CONFIG["partial_rotary_factor"]
    return config


PAIR = ModelPair(
    name="phi2",
    description="Phi-2 (PhiForCausalLM) re-authored with litert_torch.generative.examples.phi.phi2",
    features=("partial RoPE", "parallel attention+MLP", "LayerNorm", "biases", "GELU"),
    hf_class="PhiForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES", f"{EXAMPLE}:Phi2"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    # composite_body measured 7.1e-4; the band is ~3x either side.
    expected_failures=(declared(GELU_TANH_LOWERED_AS_ERF, max_abs_err=(2e-4, 2e-3)),),
)
