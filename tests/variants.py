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


# The MLP's gate and up projections swapped in the tensor-name map: loaded the wrong way round.
GATE_UP_SWAPPED = dataclasses.replace(litert_tiny_llama.TENSOR_NAMES, ff_up_proj="model.layers.{}.mlp.gate_proj",
                                      ff_gate_proj="model.layers.{}.mlp.up_proj")


def swapped_gate_up(checkpoint_path, custom_loader=None, mask_cache_size=0):
    """The tensor-name map swaps the MLP's gate and up projections (a plain builder: points come from the
    example module's map, which is right)."""
    return _build(tensor_names=GATE_UP_SWAPPED)(checkpoint_path, custom_loader, mask_cache_size)


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


# --- each family's distinguishing feature, broken at re-authoring ---------------------------------------

def broken(pair, name: str, change):
    """`pair` re-authored from its own config after `change(config)`: a re-authoring defect of one feature."""
    config_fn, tensor_names, model_class = pair.reauthored.args  # harness.reauthor.decoder_builder's partial

    def config():
        c = config_fn()
        change(c)
        return c

    return dataclasses.replace(pair, name=f"{pair.name}_{name}", reauthored=decoder_builder(config, tensor_names,
                                                                                           model_class))


def _blocks(config):
    return config.block_configs if isinstance(config.block_configs, list) else [config.block_configs]


def _no_final_softcap(c):
    c.final_logit_softcap = None


def _no_attention_softcap(c):
    for b in _blocks(c):
        b.attn_config.logit_softcap = None


def _every_layer_global(c):
    from litert_torch.generative.layers import model_config as cfg

    for b in _blocks(c):
        b.attn_config.attn_type = cfg.AttentionType.GLOBAL


def _window_doubled(c):
    for b in _blocks(c):
        if b.attn_config.sliding_window_size:
            b.attn_config.sliding_window_size *= 2


def _no_qk_norm(c):
    from litert_torch.generative.layers import model_config as cfg

    for b in _blocks(c):
        b.attn_config.query_norm_config = cfg.NormalizationConfig(cfg.NormalizationType.NONE)
        b.attn_config.key_norm_config = cfg.NormalizationConfig(cfg.NormalizationType.NONE)


def _full_rotary(c):
    for b in _blocks(c):
        b.attn_config.rotary_percentage = 1.0


def _no_qkv_bias(c):
    for b in _blocks(c):
        b.attn_config.qkv_use_bias = False


def _untied_head(c):
    c.lm_head_share_weight_with_embedding = False


# (pair, defect name, change, the checks at `reauthored` it must fail)
FAMILY_DEFECTS = (
    ("gemma2", "no_final_softcap", _no_final_softcap, ("logits",)),
    ("gemma2", "no_attention_softcap", _no_attention_softcap, ("logits",)),
    ("gemma2", "every_layer_global", _every_layer_global, ("logits",)),
    ("gemma3", "window_doubled", _window_doubled, ("logits",)),
    # without QK norms the checkpoint's q_norm/k_norm tensors have no module: qwen3's strict loader refuses
    # them; gemma3's (tied head: non-strict) maps them and load_state_dict drops them, which coverage reports
    ("qwen3", "no_qk_norm", _no_qk_norm, ("weight_coverage",)),
    ("gemma3", "no_qk_norm", _no_qk_norm, ("weight_coverage", "logits")),
    ("phi2", "full_rotary", _full_rotary, ("logits",)),
    ("qwen2_5", "no_qkv_bias", _no_qkv_bias, ("logits", "weight_coverage")),
    # an untied head the checkpoint has no tensor for: litert-torch's strict loader refuses the model
    ("smollm2", "untied_head", _untied_head, ("weight_coverage",)),
)


# --- another CPU's float rounding, emulated --------------------------------------------------------------

def ulp_perturbed(path, out, seed: int = 0) -> int:
    """Writes a copy of a flatbuffer whose float32 constants of rank 1 (norm scales, biases) moved by -1, 0 or
    +1 ulp each, at random: the size of the difference between two CPUs' float kernels. Returns how many
    tensors moved."""
    import numpy as np
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    rng, done = np.random.default_rng(seed), set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            buffer = model.buffers[tensor.buffer]
            if (tensor.type != 0 or tensor.shape is None or len(tensor.shape) != 1 or tensor.buffer in done
                    or buffer.data is None or len(buffer.data) == 0):
                continue
            done.add(tensor.buffer)
            values = np.frombuffer(bytes(buffer.data), np.float32)
            step = rng.integers(-1, 2, values.size)
            moved = np.where(step > 0, np.nextafter(values, np.float32(np.inf)),
                             np.where(step < 0, np.nextafter(values, np.float32(-np.inf)), values))
            moved = np.where(np.isfinite(values), moved, values).astype(np.float32)  # a -inf mask value stays
            buffer.data = np.frombuffer(moved.tobytes(), np.uint8)
    for buffer in model.buffers:  # offset-stored buffers come back as bytes: write them as arrays
        if buffer.data is not None and not isinstance(buffer.data, np.ndarray):
            buffer.data = np.frombuffer(buffer.data, np.uint8)
    flatbuffer_utils.write_model(model, str(out))
    return len(done)


# --- planted defects, each at one known point (tests/fixtures/planted_defects, tests/test_divergence.py) -----

def set_norm_eps(c, layer: int, epsilon: float) -> None:
    """Sets layer `layer`'s post-attention norm epsilon in config `c`, and no other layer's."""
    import copy

    c.block_configs = [copy.deepcopy(c.block_config(i)) for i in range(c.num_layers)]
    block = c.block_configs[layer]  # its norms share one config object: change a copy of one
    block.post_attention_norm_config = dataclasses.replace(block.post_attention_norm_config, epsilon=epsilon)


def one_layer_norm_eps(layer: int, epsilon: float):
    """tiny_llama's config with layer `layer`'s post-attention norm epsilon set to `epsilon` (HF: 1e-5)."""

    def config():
        c = tiny_llama.reauthored_config()
        set_norm_eps(c, layer, epsilon)
        return c

    return config


class LeakyMaskTinyLlama(litert_tiny_llama.TinyLlama):
    """A causal mask one position too permissive: position i also sees position i + 1."""

    def build_mask_cache(self, mask_cache_size: int):
        super().build_mask_cache(mask_cache_size)
        if self.mask_cache is not None:
            self.mask_cache = torch.triu(torch.full_like(self.mask_cache, float("-inf")), diagonal=2)


class OffByOneDecodeWriteTinyLlama(litert_tiny_llama.TinyLlama):
    """Decoding writes the new token's K and V one slot too far (position + 1), so the step attends to an
    empty slot instead of itself; prefill writes where it should. A defect only decoding shows."""

    def forward(self, tokens, input_pos, kv_cache, mask=None, lora=None, export_config=None):
        from litert_torch.generative.layers import kv_cache as kv_module

        if tokens.shape[1] != 1:
            return super().forward(tokens, input_pos, kv_cache, mask, lora, export_config)
        update = kv_module.update

        def shifted(cache, positions, k, v, *args, **kwargs):
            return update(cache, positions + 1, k, v, *args, **kwargs)

        kv_module.update = shifted  # attention.py calls kv_utils.update: the module's attribute, per call
        try:
            return super().forward(tokens, input_pos, kv_cache, mask, lora, export_config)
        finally:
            kv_module.update = update


# A custom op that is the identity in PyTorch and whose litert-torch lowering scales by 1.05: a lowering
# defect (the class of a wrong entry in the lowering registry) that only the StableHLO sees. Its namespace
# is its own, so registering it changes no other pair's program.
@torch.library.custom_op("edge_parity_planted::lowered_scaled", mutates_args=())
def lowered_scaled(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@lowered_scaled.register_fake
def _(x):
    return torch.empty_like(x)


def _register_scaled_lowering():
    from litert_torch.backend.lowerings._jax_lowerings import lowerings

    lowerings.lower_by_jax(torch.ops.edge_parity_planted.lowered_scaled.default)(lambda x: x * 1.05)


_register_scaled_lowering()


class LoweredScaledLinear(torch.nn.Linear):
    """A Linear whose output passes through `lowered_scaled`: right in PyTorch, 5% large once lowered."""

    def forward(self, x):
        return lowered_scaled(super().forward(x))


class LoweredWrongTinyLlama(litert_tiny_llama.TinyLlama):
    """tiny_llama whose layer 1 MLP down-projection goes through `lowered_scaled`: eager and exported agree
    with HF, the lowered StableHLO departs at layers.1.mlp.down and nowhere before."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.transformer_blocks[1].ff.w2.__class__ = LoweredScaledLinear  # same weights, same state dict


def planted(name: str, config=None, model_class=None, tensor_names=None):
    """tiny_llama with one planted defect, built by decoder_builder so its tensor-name map is the pair's own."""
    return dataclasses.replace(tiny_llama.PAIR, name=f"tiny_llama_{name}", reauthored=decoder_builder(
        config or tiny_llama.reauthored_config, tensor_names or litert_tiny_llama.TENSOR_NAMES,
        model_class or litert_tiny_llama.TinyLlama))



# --- defects only a flatbuffer has ----------------------------------------------------------------------

def scale_flatbuffer_weights(path, out, block: int, linear: str, factor: float) -> int:
    """Writes a copy of a flatbuffer whose float weights of block `block`'s Linear `linear` (by the tensor
    names the converter gives them, e.g. ".../TransformerBlock_1/.../Linear_w2;") are scaled by `factor`: a
    conversion defect at one known module that no PyTorch stage sees. Returns how many buffers moved."""
    import numpy as np
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    done = set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
            scope = name.split(";", 1)[0]
            buffer = model.buffers[tensor.buffer]
            if (f"TransformerBlock_{block}/" not in scope or not scope.endswith(f".Linear_{linear}")
                    or tensor.type != 0 or tensor.buffer in done or buffer.data is None or len(buffer.data) == 0):
                continue
            done.add(tensor.buffer)
            values = np.frombuffer(bytes(buffer.data), np.float32) * np.float32(factor)
            buffer.data = np.frombuffer(values.astype(np.float32).tobytes(), np.uint8)
    for buffer in model.buffers:  # offset-stored buffers come back as bytes: write them as arrays
        if buffer.data is not None and not isinstance(buffer.data, np.ndarray):
            buffer.data = np.frombuffer(buffer.data, np.uint8)
    flatbuffer_utils.write_model(model, str(out))
    return len(done)


def converting_with(monkeypatch, defect) -> list[int]:
    """Patches litert-torch's converter so every flatbuffer it makes (exported_programs_to_flatbuffer, which
    convert_to_tflite and the harness's conversion both end with) is rewritten by `defect(path)` of a copy,
    which returns how many things it changed; returns those counts as conversions happen."""
    import tempfile
    from pathlib import Path

    from litert_torch._convert import litert_converter

    to_flatbuffer, counts = litert_converter.exported_programs_to_flatbuffer, []

    def defective(*args, **kwargs):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.tflite"
            path.write_bytes(to_flatbuffer(*args, **kwargs).to_bytes())
            counts.append(defect(str(path)))
            return litert_converter.LazyModelExporter(content=path.read_bytes())

    monkeypatch.setattr(litert_converter, "exported_programs_to_flatbuffer", defective)
    return counts
