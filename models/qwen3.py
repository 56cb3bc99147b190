"""Qwen 3 architecture: QK norm (RMSNorm per head), GQA, no QKV bias, separate LM head (8B and up)."""

from harness.pairs import ExportSettings, ModelPair
from harness.stages import bundle_stages
from harness.reauthor import TINY_DECODER, decoder_builder, shrink_config

HF_CONFIG = dict(
    TINY_DECODER,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    # qwen3.TENSOR_NAMES maps lm_head, so the untied layout of Qwen3-8B and up.
    tie_word_embeddings=False,
)


EXAMPLE = "litert_torch.generative.examples.qwen.qwen3"  # litert-torch, imported when a model is built


def reauthored_config():
    """litert-torch's Qwen 3 4B config, cut to HF_CONFIG's shape."""
    from litert_torch.generative.examples.qwen import qwen3

    return shrink_config(qwen3.get_4b_model_config(), HF_CONFIG)


PAIR = ModelPair(
    name="qwen3",
    description="Qwen 3 (Qwen3ForCausalLM) re-authored with litert_torch.generative.examples.qwen.qwen3",
    features=("GQA", "QK norm", "RoPE", "gated MLP", "RMSNorm", "separate LM head"),
    hf_class="Qwen3ForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES", f"{EXAMPLE}:Qwen3"),
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    # Qwen's configs name no eos_token_id, and a bundle needs a stop token. Giving it one (measured with
    # eos_token_id=2: every bundle check passed) changes hf_config, and so its goldens' reference key, which
    # must then be re-recorded and checked on a second host.
    opt_in_stages=tuple((stage, "the config names no eos_token_id, so there is no stop token to bundle")
                        for stage in bundle_stages()),
)
