"""Gemma 1 (2B) architecture: MQA, tied embeddings, embedding scaling, GeGLU, zero-centered RMSNorm.

Expected failure at stablehlo only: models/_defects.py GELU_TANH_LOWERED_AS_ERF.
"""

from litert_torch.generative.examples.gemma import gemma1
from litert_torch.generative.utilities import model_builder

from models._defects import GELU_TANH_LOWERED_AS_ERF
from harness.pairs import ExportSettings, ModelPair

HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,  # MQA, as in Gemma 2B
    head_dim=32,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)


def reauthored_config():
    """litert-torch's Gemma 2B config, shrunk to the same shape as HF_CONFIG."""
    config = gemma1.get_model_config_2b()
    config.vocab_size = HF_CONFIG["vocab_size"]
    config.num_layers = HF_CONFIG["num_hidden_layers"]
    config.embedding_dim = HF_CONFIG["hidden_size"]
    config.embedding_scale = HF_CONFIG["hidden_size"] ** 0.5
    config.max_seq_len = HF_CONFIG["max_position_embeddings"]
    config.final_norm_config.epsilon = HF_CONFIG["rms_norm_eps"]
    block = config.block_config(0)
    attn = block.attn_config
    attn.num_heads = HF_CONFIG["num_attention_heads"]
    attn.head_dim = HF_CONFIG["head_dim"]
    attn.num_query_groups = HF_CONFIG["num_key_value_heads"]
    attn.rotary_base = HF_CONFIG["rope_theta"]
    block.ff_config.intermediate_size = HF_CONFIG["intermediate_size"]
    return config


def build_reauthored(checkpoint_path, custom_loader=None, mask_cache_size=0):
    # gemma1.build_2b_model retries other tensor-name maps on KeyError, which would hide a
    # missing tensor; the HF safetensors layout is TENSOR_NAMES_SEP_QKV.
    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=reauthored_config(),
        tensor_names=gemma1.TENSOR_NAMES_SEP_QKV,
        model_class=gemma1.Gemma1,
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


PAIR = ModelPair(
    name="gemma_2b",
    description="Gemma 2B (GemmaForCausalLM) re-authored with litert_torch.generative.examples.gemma.gemma1",
    features=("MQA", "tied embeddings", "embedding scaling", "GeGLU", "zero-centered RMSNorm"),
    hf_class="GemmaForCausalLM",
    hf_config=HF_CONFIG,
    reauthored=build_reauthored,
    export=ExportSettings(prefill_lens=(8, 16), kv_cache_max=64),
    # Gemma's zero-centered norms scale by 1 + w (about 2 under the default init) and its
    # embeddings by sqrt(hidden): at std 0.15 attention saturates (entropy ratio 0.10) and
    # the eager float error reaches 7.6e-5 on logits of magnitude 14. At 0.08 the entropy
    # ratio is 0.38, like the other pairs at 0.15, and the error 7.9e-6.
    init_std=0.08,
    expected_failure=GELU_TANH_LOWERED_AS_ERF,
)
