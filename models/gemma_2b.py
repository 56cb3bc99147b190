"""Gemma 1 (2B) architecture: MQA, tied embeddings, embedding scaling, GeGLU, zero-centered RMSNorm.

Declares models/_defects.py GELU_TANH_LOWERED_AS_ERF: its stablehlo composite_body record is xfail inside the
measured band; every stage, stablehlo included, gates at full tolerance.
"""

from models._defects import GELU_TANH_LOWERED_AS_ERF, declared
from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=1,  # MQA, as in Gemma 2B
    head_dim=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)


EXAMPLE = "litert_torch.generative.examples.gemma.gemma1"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's Gemma 2B config, cut to HF_CONFIG's shape, embeddings scaled by sqrt(width)."""
    from litert_torch.generative.examples.gemma import gemma1

    config = shrink_config(gemma1.get_model_config_2b(), HF_CONFIG)
    config.embedding_scale = HF_CONFIG["hidden_size"] ** 0.5
    return config


PAIR = ModelPair(
    name="gemma_2b",
    description="Gemma 2B (GemmaForCausalLM) re-authored with litert_torch.generative.examples.gemma.gemma1",
    features=("MQA", "tied embeddings", "embedding scaling", "GeGLU", "zero-centered RMSNorm"),
    hf_class="GemmaForCausalLM",
    hf_config=HF_CONFIG,
    # f"{EXAMPLE}:build_2b_model" retries other tensor-name maps on KeyError, which would hide a
    # missing tensor; the HF safetensors layout is TENSOR_NAMES_SEP_QKV.
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES_SEP_QKV", f"{EXAMPLE}:Gemma1"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    # Gemma's zero-centered norms scale by 1 + w (about 2 under the default init) and its
    # embeddings by sqrt(hidden): at std 0.15 attention saturates (entropy ratio 0.10) and
    # the eager float error reaches 7.6e-5 on logits of magnitude 14. At 0.08 the entropy
    # ratio is 0.38, like the other pairs at 0.15, and the error 7.9e-6.
    init_std=0.08,
    # composite_body measured 1.18e-3; the band is ~3x either side.
    expected_failures=(declared(GELU_TANH_LOWERED_AS_ERF, max_abs_err=(4e-4, 3.5e-3)),),
)
