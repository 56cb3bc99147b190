"""Qwen 2.5 architecture: QKV bias, GQA, RMSNorm, gated SiLU MLP, tied embeddings (0.5B-3B)."""

from litert_torch.generative.examples.qwen import qwen
from litert_torch.generative.utilities import model_builder

from harness.pairs import ExportSettings, ModelPair

HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def reauthored_config():
    """litert-torch's Qwen 2.5 3B config, shrunk to the same shape as HF_CONFIG."""
    config = qwen.get_3b_model_config()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    config.final_norm_config.epsilon = HF_CONFIG["rms_norm_eps"]
    block = config.block_config(0)
    attn = block.attn_config
    attn.num_heads = HF_CONFIG["num_attention_heads"]
    attn.head_dim = HF_CONFIG["hidden_size"] // HF_CONFIG["num_attention_heads"]
    attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
    attn.rotary_base = HF_CONFIG["rope_theta"]
    block.ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=qwen.TENSOR_NAMES,
        model_class=qwen.Qwen,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="qwen2_5",
    description="Qwen 2.5 (Qwen2ForCausalLM) re-authored with litert_torch.generative.examples.qwen.qwen",
    features=("GQA", "QKV bias", "RoPE", "gated MLP", "RMSNorm", "tied embeddings"),
    hf_class="Qwen2ForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
