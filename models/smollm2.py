"""SmolLM2 (135M) architecture: Llama layout with the LM head tied to the embedding."""

from harness.pairs import ExportSettings, ModelPair
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=100_000.0,  # SmolLM2's
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


EXAMPLE = "litert_torch.generative.examples.smollm.smollm"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's SmolLM2 config, cut to HF_CONFIG's shape."""
    from litert_torch.generative.examples.smollm import smollm

    return shrink_config(smollm.get_model_config_v2(), HF_CONFIG)


PAIR = ModelPair(
    name="smollm2",
    description="SmolLM2 (LlamaForCausalLM, tied head) re-authored with litert_torch.generative.examples.smollm",
    features=("GQA", "RoPE", "gated MLP", "RMSNorm", "tied head"),
    hf_class="LlamaForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES", f"{EXAMPLE}:SmolLM2"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
