"""The programs litert-torch converts: torch.export programs and the StableHLO it lowers them to.

Both are produced with the converter's own code path (its signature builder, export,
FX passes and MLIR lowering), so what runs here is what the converter consumes.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.runners import _FixedShapeRunner


def export_config():
    from litert_torch.generative.utilities import export_config as ec

    return ec.ExportConfig(output_logits_on_prefill=True)


def converter_signatures(model, prefill_lens, kv_cache_max):
    """The prefill_<len> and decode signatures exactly as converter.convert_to_tflite adds them."""
    from litert_torch._convert import interface
    from litert_torch.generative.utilities import converter

    conv = interface.Converter()
    converter._add_signatures(  # the converter's own builder, so sample inputs match the flatbuffer
        conv, model, list(prefill_lens), kv_cache_max, None, 0, model.config, [None], export_config()
    )
    return list(conv._signatures)


def export_programs(signatures) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of each signature, with the converter's pre-conversion decompositions."""
    from litert_torch._convert import core

    return {sig.name: core.export_torch_signature(sig) for sig in signatures}


def _markers(module) -> list:
    """Every mark_tensor custom call, with its decoded backend_config."""
    import json

    from litert_converter.mlir import ir

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    walk(child)
                    if (child.name == "stablehlo.custom_call"
                            and ir.StringAttr(child.attributes["call_target_name"]).value == "mark_tensor"):
                        found.append((child, json.loads(ir.StringAttr(child.attributes["backend_config"]).value)))

    walk(module.operation)
    return found


def _lookup_as_gather(output_marker, indices, weight):
    """The converter's embedding_lookup: a plain row gather of the weight.

    The marked decomposition (torchax's embedding) also zeroes the padding_idx row,
    which PyTorch's forward and the converter's TFL embedding_lookup do not.
    """
    from litert_converter.mlir import ir

    rows = ir.RankedTensorType(weight.type).shape[1]
    with ir.InsertionPoint(output_marker):
        gather = ir.Operation.create(
            "stablehlo.gather",
            results=[output_marker.results[0].type],
            operands=[weight, indices],
            attributes={
                "dimension_numbers": ir.Attribute.parse(
                    "#stablehlo.gather<offset_dims = [1], collapsed_slice_dims = [0], "
                    "start_index_map = [0], index_vector_dim = 1>"),
                "slice_sizes": ir.Attribute.parse(f"array<i64: 1, {rows}>"),
                "indices_are_sorted": ir.BoolAttr.get(False),
            },
            loc=output_marker.location,
        )
    return gather.results[0]


def resolve_tensor_markers(module) -> dict[str, int]:
    """Resolves high-level-function-boundary markers the way the converter does.

    litert-torch wraps the inputs and outputs of fused ops (RMS norm, SDPA, embedding
    lookup) in `stablehlo.custom_call @mark_tensor` so its converter can replace each
    marked region with one TFL op. XlaCallModule has no kernel for the markers.
    Numerically a marker returns its operand unchanged, so each is replaced by it;
    an embedding_lookup region is replaced by a plain gather, as the converter does,
    because its decomposition differs from PyTorch at the padding_idx row.
    """
    markers = _markers(module)
    lookups: dict[str, dict] = {}
    for op, config in markers:
        if config["name"] == "odml.embedding_lookup":
            lookups.setdefault(config["id"], {})[(config["is_input"], config["pos"])] = op
    for parts in lookups.values():
        output = parts[(False, 0)]
        gathered = _lookup_as_gather(output, parts[(True, 0)].operands[0], parts[(True, 1)].operands[0])
        output.results[0].replace_all_uses_with(gathered)
    for op, _ in markers:
        assert op.operands[0].type == op.results[0].type, "a marker changed a type"
        op.results[0].replace_all_uses_with(op.operands[0])
        op.erase()
    return {"identities": len(markers), "embedding_lookups_as_gather": len(lookups)}


def lower_programs(programs: dict[str, torch.export.ExportedProgram], inline_weights: bool = True):
    """Each program through the converter's FX passes and MLIR lowering, markers resolved.

    Weights are inlined as constants, as litert-torch's default converter does; with
    inline_weights=False they stay function arguments (its V2 converter's lowering), which
    XlaCallModule is then fed from the state dict: the way past its 2 GiB module limit.
    """
    from litert_torch import backend
    from litert_torch._convert import core

    lowered, resolved = {}, {}
    for name, ep in programs.items():
        module = backend.export.exported_program_to_mlir(core._run_convert_passes(ep), inline_constants=inline_weights)
        with module.ctx:
            for key, count in resolve_tensor_markers(module.module).items():
                resolved[key] = resolved.get(key, 0) + count
        lowered[name] = module
    return lowered, resolved


# XlaCallModule receives the module as text inside a protobuf, which caps at 2 GiB; the
# lowered module inlines every weight as a hex literal (two characters per byte).
XLA_CALL_MODULE_LIMIT = 2**31


def inlined_weight_bytes(model) -> int:
    """Bytes of distinct weights the lowered module carries inline (tied weights count once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def fits_inline(model) -> bool:
    """Whether the module with its weights inlined stays under XlaCallModule's 2 GiB limit."""
    return 2 * inlined_weight_bytes(model) < XLA_CALL_MODULE_LIMIT * 0.9


def custom_calls(lowered) -> list[str]:
    """Custom calls left in the lowered modules: anything here could not be executed."""
    import re

    names = set()
    for module in lowered.values():
        names.update(re.findall(r"stablehlo\.custom_call @(\w+)", module.get_text()))
    return sorted(names)


class StableHLORunner(_FixedShapeRunner):
    """The lowered StableHLO, executed by TensorFlow's XlaCallModule on CPU."""

    def __init__(self, lowered, prefill_lens, kv_cache_max):
        super().__init__(prefill_lens, kv_cache_max)
        self.lowered = lowered
        decode = lowered["decode"]
        user_inputs = sorted((s for s in decode.input_signature if s.input_spec.is_user_input),
                             key=lambda s: s.input_spec.i)
        self.kv_shapes = [tuple(s.shape) for s in user_inputs[2:]]  # after tokens, input_pos

    def empty_kv(self):
        return [np.zeros(shape, np.float32) for shape in self.kv_shapes]

    def call(self, name, tokens, positions, kv):
        outputs = self.lowered[name](tokens, positions, *kv)
        return np.array(outputs[0])[0], [np.array(o) for o in outputs[1:]]
