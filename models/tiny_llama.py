"""TinyLlama architecture: GQA, RoPE, gated SiLU MLP, RMSNorm, separate LM head."""

from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


EXAMPLE = "litert_torch.generative.examples.tiny_llama.tiny_llama"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's TinyLlama config, cut to HF_CONFIG's shape."""
    from litert_torch.generative.examples.tiny_llama import tiny_llama

    return shrink_config(tiny_llama.get_model_config(), HF_CONFIG)


PAIR = ModelPair(
    name="tiny_llama",
    description="TinyLlama (LlamaForCausalLM) re-authored with litert_torch.generative.examples.tiny_llama",
    features=("GQA", "RoPE", "gated MLP", "RMSNorm"),
    hf_class="LlamaForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES", f"{EXAMPLE}:TinyLlama"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
