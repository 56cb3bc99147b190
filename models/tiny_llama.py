"""TinyLlama architecture: GQA, RoPE, gated SiLU MLP, RMSNorm, separate LM head."""

from litert_torch.generative.examples.tiny_llama import tiny_llama
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
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def reauthored_config():
    """litert-torch's TinyLlama config, shrunk to the same shape as HF_CONFIG."""
    config = tiny_llama.get_model_config()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    attn = config.block_config(0).attn_config
    attn.num_heads = HF_CONFIG["num_attention_heads"]
    attn.head_dim = HF_CONFIG["head_dim"]
    attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
    attn.rotary_base = HF_CONFIG["rope_theta"]
    config.block_config(0).ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=tiny_llama.TENSOR_NAMES,
        model_class=tiny_llama.TinyLlama,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="tiny_llama",
    description="TinyLlama (LlamaForCausalLM) re-authored with litert_torch.generative.examples.tiny_llama",
    features=("GQA", "RoPE", "gated MLP", "RMSNorm"),
    hf_class="LlamaForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
)
