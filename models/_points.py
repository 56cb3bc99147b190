"""Divergence points that pairs of one family declare (ModelPair.divergence_points): modules their
tensor-name map loads weights into but names no module for. Shared, so a change here touches every pair
(harness/affected.py)."""

from harness.pairs import DivergencePoint

# The QK norm sits between the q/k projections and RoPE; the tensor-name map loads its weights but names no
# module for it, so it is matched here (HF applies it to [heads, position, dim], litert-torch to
# [position, heads, dim]).
QK_NORM_POINTS = (
    DivergencePoint("attention.q_norm", "model.layers.{}.self_attn.q_norm", "transformer_blocks.{}.atten_func.query_norm",
                    after="attention.v", hf_take="heads"),
    DivergencePoint("attention.k_norm", "model.layers.{}.self_attn.k_norm", "transformer_blocks.{}.atten_func.key_norm",
                    after="attention.q_norm", hf_take="heads"),
)
