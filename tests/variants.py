"""Deliberately broken re-authored builders for tiny_llama: each defect must fail the right stage."""

import dataclasses

import torch
from litert_torch.generative.examples.tiny_llama import tiny_llama as litert_tiny_llama

from harness.reauthor import decoder_builder
from models import tiny_llama


def _build(config=None, tensor_names=None, model_class=litert_tiny_llama.TinyLlama):
    return decoder_builder(lambda: config or tiny_llama.reauthored_config(),
                           tensor_names or litert_tiny_llama.TENSOR_NAMES, model_class)


def wrong_rope_base(checkpoint_path, custom_loader=None, mask_cache_size=0):
    """RoPE base 50% too large."""
    config = tiny_llama.reauthored_config()
    config.block_config(0).attn_config.rotary_base *= 1.5
    return _build(config)(checkpoint_path, custom_loader, mask_cache_size)


def swapped_gate_up(checkpoint_path, custom_loader=None, mask_cache_size=0):
    """The tensor-name map swaps the MLP's gate and up projections."""
    names = dataclasses.replace(litert_tiny_llama.TENSOR_NAMES, ff_up_proj="model.layers.{}.mlp.gate_proj",
                                ff_gate_proj="model.layers.{}.mlp.up_proj")
    return _build(tensor_names=names)(checkpoint_path, custom_loader, mask_cache_size)


class _SkewedWhenExported(litert_tiny_llama.TinyLlama):
    """Right in eager mode, wrong once traced by torch.export: a defect only export-derived stages see."""

    def forward(self, tokens, input_pos, kv_cache, mask=None, lora=None, export_config=None):
        out = super().forward(tokens, input_pos, kv_cache, mask, lora, export_config)
        if torch.compiler.is_exporting() and "logits" in out:
            out["logits"] = out["logits"] * 1.01
        return out


def skewed_when_exported(checkpoint_path, custom_loader=None, mask_cache_size=0):
    return _build(model_class=_SkewedWhenExported)(checkpoint_path, custom_loader, mask_cache_size)


class _FailsToExport(litert_tiny_llama.TinyLlama):
    def forward(self, *args, **kwargs):
        if torch.compiler.is_exporting():
            raise RuntimeError("injected: this model cannot be exported")
        return super().forward(*args, **kwargs)


def fails_to_export(checkpoint_path, custom_loader=None, mask_cache_size=0):
    return _build(model_class=_FailsToExport)(checkpoint_path, custom_loader, mask_cache_size)


def variant(builder, **changes):
    return dataclasses.replace(tiny_llama.PAIR, name=f"tiny_llama_{builder.__name__}", reauthored=builder, **changes)
