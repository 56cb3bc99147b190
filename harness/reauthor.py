"""Tiny re-authored models: litert-torch's published configs cut to the shape of a tiny HF config.

A pair file takes the config of the model it re-authors (e.g. `tiny_llama.get_model_config()`),
passes it through `shrink_config` with its HF_CONFIG, adjusts what is particular to the
architecture (soft-caps, windows, RoPE scaling), and builds with `decoder_builder`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

from harness.pairs import resolve

if TYPE_CHECKING:  # litert-torch is imported when a model is built, so listing pairs stays fast
    from litert_torch.generative.layers import model_config as cfg

# The shape every tiny pair starts from (a pair file adds its KV heads and what is particular to it):
# converts in seconds, and 256 positions leave room for every workload and KV cache.
TINY_DECODER = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256)


def hf_head_dim(hf_config: dict[str, Any]) -> int:
    """HF's head_dim, or hidden_size / heads where the config leaves it implicit (Phi-2, Qwen 2.5)."""
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def hf_rope_theta(hf_config: dict[str, Any]) -> float | None:
    """The RoPE base, written as rope_theta or inside rope_parameters (transformers 5); None when it is
    per layer type (Gemma 3), which the pair file then sets itself."""
    return hf_config.get("rope_theta", hf_config.get("rope_parameters", {}).get("rope_theta"))


def shrink_config(config: cfg.ModelConfig, hf_config: dict[str, Any]) -> cfg.ModelConfig:
    """Sets every size the litert-torch config shares with the HF config, in place.

    Vocabulary, layers (a per-layer list is cut to the first `num_hidden_layers`), width,
    context, heads, head_dim, KV groups, RoPE base, MLP width, every norm's epsilon and,
    when the HF config says, whether the head shares the embedding.
    """
    config.vocab_size = hf_config["vocab_size"]
    config.num_layers = hf_config["num_hidden_layers"]
    config.embedding_dim = hf_config["hidden_size"]
    config.max_seq_len = hf_config["max_position_embeddings"]
    if "tie_word_embeddings" in hf_config:
        config.lm_head_share_weight_with_embedding = hf_config["tie_word_embeddings"]
    if isinstance(config.block_configs, list):
        config.block_configs = config.block_configs[: config.num_layers]
    epsilon = hf_config.get("rms_norm_eps", hf_config.get("layer_norm_eps"))
    blocks = config.block_configs if isinstance(config.block_configs, list) else [config.block_configs]
    for block in blocks:
        attn = block.attn_config
        attn.num_heads = hf_config["num_attention_heads"]
        attn.head_dim = hf_head_dim(hf_config)
        attn.num_query_groups = hf_config["num_key_value_heads"]
        if hf_rope_theta(hf_config) is not None:
            attn.rotary_base = hf_rope_theta(hf_config)
        block.ff_config.intermediate_size = hf_config["intermediate_size"]
        if epsilon is not None:
            for norm in (block.pre_attention_norm_config, block.post_attention_norm_config,
                         block.ff_config.pre_ff_norm_config, block.ff_config.post_ff_norm_config):
                norm.epsilon = epsilon
    if epsilon is not None:
        config.final_norm_config.epsilon = epsilon
    return config


def _build_decoder(config_fn, tensor_names, model_class, checkpoint_path, custom_loader=None, mask_cache_size=0):
    from litert_torch.generative.utilities import model_builder

    return model_builder.build_decoder_only_model(
        checkpoint_path=checkpoint_path,
        config=config_fn(),
        tensor_names=resolve(tensor_names),
        model_class=resolve(model_class),
        custom_loader=custom_loader,
        mask_cache_size=mask_cache_size,
    )


def decoder_builder(config_fn: Callable[[], cfg.ModelConfig], tensor_names, model_class) -> Callable[..., Any]:
    """A pair's `reauthored`: litert-torch's decoder-only builder on `config_fn()`, loading by `tensor_names`.

    `tensor_names` and `model_class` may be objects or "module:attribute" names of litert-torch's example
    modules, imported only when the model is built. The example modules' own build_* functions are not
    used: several retry other tensor-name maps on a KeyError (or return None), which would hide a
    missing checkpoint tensor.
    """
    return functools.partial(_build_decoder, config_fn, tensor_names, model_class)
