"""The programs litert-torch converts: torch.export programs and the StableHLO it lowers them to.

Both are produced with the converter's own code path (its signature builder, export,
FX passes and MLIR lowering), so what runs here is what the converter consumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.paths import display_path
from harness.programs import is_own, weights_read_back
from harness.runners import KVLayers, Runner


def export_config(kv_layout: str = "default"):
    """litert-torch's export settings: logits on prefill, and the KV layout ("transposed" for a bundle: the
    LiteRT-LM engine reads the cache's length from dimension 2)."""
    from litert_torch.generative.layers import kv_cache
    from litert_torch.generative.utilities import export_config as ec

    config = ec.ExportConfig(output_logits_on_prefill=True)
    if kv_layout == "transposed":
        config.kvcache_layout = kv_cache.KV_LAYOUT_TRANSPOSED
    elif kv_layout != "default":
        raise ValueError(f"unknown KV layout {kv_layout!r}")
    return config


def quiet_progress() -> None:
    """litert-torch prints a progress line per export and lowering step; a run says what it measured instead
    (`harness -v` shows them)."""
    import os

    from litert_torch import progress

    from harness.config import VERBOSE_ENV

    progress.console.quiet = not os.environ.get(VERBOSE_ENV)


def converter_signatures(model, prefill_lens, kv_cache_max, kv_layout: str = "default"):
    """The prefill_<len> and decode signatures exactly as converter.convert_to_tflite adds them."""
    from litert_torch._convert import interface
    from litert_torch.generative.utilities import converter

    conv = interface.Converter()
    converter._add_signatures(  # the converter's own builder, so sample inputs match the flatbuffer
        conv, model, list(prefill_lens), kv_cache_max, None, 0, model.config, [None], export_config(kv_layout)
    )
    return list(conv._signatures)


def export_programs(signatures) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of each signature, with the converter's pre-conversion decompositions."""
    from litert_torch._convert import core

    quiet_progress()
    return {sig.name: core.export_torch_signature(sig) for sig in signatures}


def _markers(module) -> list:
    """Every mark_tensor custom call, with its decoded backend_config."""
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


def _tanh_gelu(output_marker, x):
    """gelu(x, approximate="tanh") as the converter's TFL GELU computes it: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    import math

    from litert_converter.mlir import ir

    kind = ir.RankedTensorType(x.type)

    def op(name, *operands):
        return ir.Operation.create(name, results=[x.type], operands=list(operands), loc=output_marker.location).results[0]

    def const(value):
        attr = ir.DenseElementsAttr.get_splat(kind, ir.FloatAttr.get(kind.element_type, value))
        return ir.Operation.create("stablehlo.constant", results=[x.type], attributes={"value": attr},
                                   loc=output_marker.location).results[0]

    with ir.InsertionPoint(output_marker), output_marker.location:
        cube = op("stablehlo.multiply", op("stablehlo.multiply", x, x), x)
        inner = op("stablehlo.multiply", const(math.sqrt(2.0 / math.pi)),
                   op("stablehlo.add", x, op("stablehlo.multiply", const(0.044715), cube)))
        return op("stablehlo.multiply", op("stablehlo.multiply", const(0.5), x),
                  op("stablehlo.add", const(1.0), op("stablehlo.tanh", inner)))


# Composites whose StableHLO body is not what the converter builds from their attributes; each is
# resolved from its attributes: (composite name, attribute condition, replacement of the output).
GELU = "aten.gelu.default"
EMBEDDING_LOOKUP = "odml.embedding_lookup"


def _regions(markers) -> dict[str, dict]:
    """Marked regions by id: name, attributes (set on its output marker) and marker ops by (is_input, pos)."""
    regions: dict[str, dict] = {}
    for op, config in markers:
        region = regions.setdefault(config["id"], {"name": config["name"], "attr": None, "ops": {}})
        region["ops"][(config["is_input"], config["pos"])] = op
        region["attr"] = region["attr"] or config.get("attr")
    return regions


def resolve_tensor_markers(module, composites: bool = True) -> dict[str, int]:
    """Resolves high-level-function-boundary markers the way the converter does.

    litert-torch wraps the inputs and outputs of fused ops (RMS norm, SDPA, embedding
    lookup, GELU) in `stablehlo.custom_call @mark_tensor` so its converter can replace each
    marked region with one TFL op. XlaCallModule has no kernel for the markers.
    Numerically a marker returns its operand unchanged, so each is replaced by it.
    With `composites`, a region whose body differs from the op the converter builds is
    replaced by that op: an embedding_lookup by a plain gather (its decomposition also zeroes
    the padding_idx row, which PyTorch's forward and the TFL op do not), and a tanh GELU by the
    tanh formula (litert-torch 0.10.0 lowers its body as the exact erf GELU while the converter
    reads approximate="tanh" from the attribute). Without it every body runs as lowered.
    """
    markers = _markers(module)
    counts = {"identities": len(markers), "embedding_lookups_as_gather": 0, "tanh_gelus_from_attribute": 0}
    for region in _regions(markers).values() if composites else ():
        ops, attr = region["ops"], region["attr"] or {}
        if region["name"] == EMBEDDING_LOOKUP:
            output = ops[(False, 0)]
            value = _lookup_as_gather(output, ops[(True, 0)].operands[0], ops[(True, 1)].operands[0])
            counts["embedding_lookups_as_gather"] += 1
        elif region["name"] == GELU and attr.get("approximate") == "tanh":
            output = ops[(False, 0)]
            value = _tanh_gelu(output, ops[(True, 0)].operands[0])
            counts["tanh_gelus_from_attribute"] += 1
        else:
            continue
        output.results[0].replace_all_uses_with(value)
    for op, _ in markers:
        assert op.operands[0].type == op.results[0].type, "a marker changed a type"
        op.results[0].replace_all_uses_with(op.operands[0])
        op.erase()
    return counts


def lower_modules(programs: dict[str, torch.export.ExportedProgram], inline_weights: bool = True) -> dict:
    """Each program through the converter's FX passes and MLIR lowering (`exported_program_to_mlir`), composite
    markers intact: with weights inlined, the very modules litert-torch's converter merges into a flatbuffer.

    Weights are inlined as constants, as litert-torch's default converter does; with inline_weights=False they
    stay function arguments (its V2 converter's lowering), which XlaCallModule is then fed from the state dict:
    the way past its 2 GiB module limit. The programs are changed in place by the FX passes.
    """
    from litert_torch import backend
    from litert_torch._convert import core

    quiet_progress()
    return {name: backend.export.exported_program_to_mlir(core._run_convert_passes(ep), inline_constants=inline_weights)
            for name, ep in programs.items()}


def resolve_modules(modules: dict, bodies_of: tuple[str, ...] = ()):
    """The modules the stablehlo stage executes, made from lower_modules' in place: markers resolved. For the
    signatures named in `bodies_of`, a copy with every composite body as lowered is returned too, to measure what
    resolving composites from their attributes changes. Returns (lowered, resolved counts, bodies)."""
    import dataclasses

    from litert_converter.mlir import ir

    resolved, bodies = {}, {}
    for name, module in modules.items():
        with module.ctx:
            if name in bodies_of:
                copy = dataclasses.replace(module, module=ir.Module.parse(module.module_bytecode), _tf_function=None)
                resolve_tensor_markers(copy.module, composites=False)
                bodies[name] = copy
            for key, count in resolve_tensor_markers(module.module).items():
                resolved[key] = resolved.get(key, 0) + count
    return modules, resolved, bodies


def lower_programs(programs: dict[str, torch.export.ExportedProgram], inline_weights: bool = True,
                   bodies_of: tuple[str, ...] = ()):
    """Each program lowered as the converter lowers it and resolved as the stablehlo stage runs it
    (lower_modules, then resolve_modules)."""
    return resolve_modules(lower_modules(programs, inline_weights), bodies_of)


LOWERED_KIND = "lowered"  # the cache's kind for lower_modules' modules, markers intact
STABLEHLO_KIND = "stablehlo"  # the cache's kind for the stablehlo stage's modules, markers resolved
_SIGNATURES = "signatures.json"  # per module: its input and output signatures; the module is <name>.mlirbc


def _signature_json(signature) -> dict:
    spec = signature.input_spec
    return {"shape": list(signature.shape), "dtype": str(signature.dtype).removeprefix("torch."),
            "input_spec": None if spec is None else {"type": spec.type_.value, "i": spec.i, "name": spec.name}}


def _signature_from(data: dict):
    from litert_torch.backend.export import InputSpec, VariableSignature

    spec = data["input_spec"]
    return VariableSignature(data["shape"], getattr(torch, data["dtype"]), None if spec is None else InputSpec(
        InputSpec.VariableType(spec["type"]), spec["i"], spec["name"]))


def _program_tensors(program) -> dict[str, torch.Tensor]:
    return {**program.state_dict, **program.constants}


def save_lowered(out, lowered: dict, resolved: dict, bodies: dict, programs: dict) -> None:
    """Writes what lower_programs returned (or lower_modules' modules, with nothing resolved and no bodies) as
    bytecode and JSON. A module with its weights as arguments reads its program's own parameters and constants
    (`programs`, by signature name): their names are written, not their data, and load_lowered takes them from
    the programs again."""
    modules = {**{name: ("lowered", m) for name, m in lowered.items()},
               **{f"{name}.as_lowered": ("bodies", m) for name, m in bodies.items()}}
    index = {"resolved": resolved, "modules": {}}
    for file, (group, module) in modules.items():
        name = file.removesuffix(".as_lowered")
        own = _program_tensors(programs[name])
        for key, tensor in module.state_dict.items():
            if not is_own(tensor, own.get(key)):
                raise ValueError(f"module {file} reads {key}, which is not its program's own tensor: not cached")
        (Path(out) / f"{file}.mlirbc").write_bytes(module.module_bytecode)
        index["modules"][file] = {"group": group, "name": name, "weights": list(module.state_dict),
                                  "inputs": [_signature_json(s) for s in module.input_signature],
                                  "outputs": [_signature_json(s) for s in module.output_signature]}
    (Path(out) / _SIGNATURES).write_text(json.dumps(index, indent=1, sort_keys=True))


def load_lowered(entry, programs: dict):
    """lower_programs' (lowered, resolved, bodies) from a cache entry save_lowered wrote, a module's weights
    taken from its program in `programs` (as lowering them would)."""
    from litert_converter.mlir import ir
    from litert_torch.backend import export_utils
    from litert_torch.backend.export import MlirLowered

    index = json.loads((Path(entry) / _SIGNATURES).read_text())
    groups: dict[str, dict] = {"lowered": {}, "bodies": {}}
    for file, meta in index["modules"].items():
        context = export_utils.create_ir_context()
        with context:
            module = ir.Module.parse((Path(entry) / f"{file}.mlirbc").read_bytes())
        inputs = [_signature_from(s) for s in meta["inputs"]]
        weights = weights_read_back(entry, f"module {file}", {s.input_spec.name: (s.shape, s.dtype) for s in inputs
                                                              if s.input_spec.is_parameter},
                                    _program_tensors(programs[meta["name"]]))
        if sorted(weights) != sorted(meta["weights"]):
            raise HarnessError(f"cache entry {display_path(entry)}: module {file} lists weights its inputs do not "
                               "take; delete the entry so it is lowered again")
        groups[meta["group"]][meta["name"]] = MlirLowered(
            context, module, weights, inputs, [_signature_from(s) for s in meta["outputs"]])
    return groups["lowered"], index["resolved"], groups["bodies"]


def cached_modules(cache, key: dict, programs: dict, inline_weights: bool) -> tuple[Path, dict]:
    """lower_modules through the cache: what the stablehlo stage resolves and, weights inlined, what a float
    flatbuffer of the default KV layout is converted from (harness/convert.py), so a cold run lowers each program
    once. A miss lowers `programs` in place. Returns the entry and the modules by signature name."""
    entry = cache.get_or_build(LOWERED_KIND, key, lambda out: save_lowered(
        out, lower_modules(programs, inline_weights), {}, {}, programs))
    return entry, load_lowered(entry, programs)[0]


def cached_lowering(cache, key: dict, programs: dict, inline_weights: bool, bodies_of: tuple[str, ...]):
    """lower_programs through the cache, for `key` from harness.convert.lowering_key: a hit skips the FX passes,
    the MLIR lowering and the resolution (~4 s a tiny pair, ~55 s the real Gemma 3 270M's weights-as-arguments
    modules), and what runs is always what the entry holds. A miss resolves the modules of key["modules"]
    (cached_modules: lowered on a miss, in place). Returns the entry and lower_programs' (lowered, resolved,
    bodies)."""
    def build(out) -> None:
        _, modules = cached_modules(cache, key["modules"], programs, inline_weights)
        save_lowered(out, *resolve_modules(modules, bodies_of), programs)

    entry = cache.get_or_build(STABLEHLO_KIND, key, build)
    return entry, load_lowered(entry, programs)


def stage_lowering(cache, pair, checkpoint: Path, model, programs: dict, bodies_of: tuple[str, ...]):
    """The stablehlo stage's lowering of a pair's exported programs, through the cache: weights inlined where they
    fit, composite bodies kept as lowered for `bodies_of`. What the stage runs, and what a test or a tool that
    needs the same StableHLO reads instead of lowering again. Returns what cached_lowering returns."""
    from harness.convert import lowering_key

    inline = fits_inline(model)
    key = lowering_key(pair, checkpoint, cache.code_digests(), inline, tuple(bodies_of))
    return cached_lowering(cache, key, programs, inline, tuple(bodies_of))


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


def share_weights(modules) -> int:
    """Feeds every module of one export the same TensorFlow variable per weight; returns the variables made.

    litert-torch's tf_integration gives each module's tf.function a tf.Variable copy of every weight it
    takes as an argument (`_build_tf_state_dict`): four copies of the real Gemma 3 270M's 1.07 GB of
    weights across its three signatures and the composite-body copy. The modules' state dicts hold the
    same tensors (one export), so a weight of the same name and storage is one variable here. Builds on
    tf_integration's private builders, as the lowering above builds on the converter's passes.
    """
    import tensorflow as tf
    from litert_torch.backend import tf_integration

    variables = {}
    for module in modules:
        weights = {}
        for sig in module.input_signature:
            if sig.input_spec.is_parameter:
                name = sig.input_spec.name
                tensor = module.state_dict[name]
                key = (name, tensor.data_ptr(), tuple(tensor.shape), str(tensor.dtype))
                if key not in variables:
                    variables[key] = tf.Variable(tensor.detach().numpy(), trainable=False,
                                                 name=tf_integration._mangle_tf_root_scope_name(name))
                weights[name] = variables[key]
        module._tf_function = tf.function(tf_integration._wrap_as_tf_func(module, weights),
                                          input_signature=tf_integration._make_input_signatures(module))
    return len(variables)


XLA_KIND = "xla"  # the cache's kind for XLA's compiled executables of a stablehlo entry's modules
_XLA_DIRECTORY_FLAG = "--tf_xla_persistent_cache_directory"
_xla_directory: Path | None = None  # this process's TensorFlow persistent XLA cache, once set


def process_xla_directory() -> Path:
    """The directory TensorFlow's XLA keeps this process's compiled executables in and looks for them first
    (TF_XLA_FLAGS --tf_xla_persistent_cache_directory). TensorFlow reads its XLA flags once, when its runtime
    starts (the first variable or call: share_weights' variables, where weights are arguments), so the flag is
    set before the stage's first TensorFlow call and then stays for the process; a process whose TensorFlow
    started before (a test worker) still runs right, it only compiles again. In a child it lies in the job's
    scratch directory, which the parent removes."""
    global _xla_directory
    if _xla_directory is None:
        import atexit
        import tempfile

        from harness import child

        scratch = child.scratch()
        _xla_directory = Path(tempfile.mkdtemp(prefix="edge-parity-xla-", dir=scratch))
        if scratch is None:
            atexit.register(shutil.rmtree, _xla_directory, True)
        os.environ["TF_XLA_FLAGS"] = " ".join(
            [*os.environ.get("TF_XLA_FLAGS", "").split(), f"{_XLA_DIRECTORY_FLAG}={_xla_directory}"])
    return _xla_directory


def xla_key(stablehlo_entry: Path) -> dict:
    """What shapes XLA's executables of a stablehlo entry: its modules (the entry's key holds them and the
    libraries' code, TensorFlow's XLA included), this CPU (XLA compiles for the host's instructions: an
    AVX-512 machine's code could not run on an AVX2 one) and the user's XLA flags."""
    from harness.records import cpu_flags, cpu_model

    flags = [f for f in os.environ.get("TF_XLA_FLAGS", "").split() if not f.startswith(_XLA_DIRECTORY_FLAG)]
    return {"stablehlo": stablehlo_entry.name, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "tf_xla_flags": flags}


@contextlib.contextmanager
def compiled_executables(cache, stablehlo_entry: Path):
    """XLA's executables of the entry's modules through the cache, for the calls inside the block: a hit is
    copied where TensorFlow looks before it compiles, so a signature loads instead of compiling (~1 s each on a
    tiny pair, 2-core EPYC); on a miss, what the block compiled is published. TensorFlow keys each executable by
    its HLO and, loading, checks the whole HLO against the one it would compile; the cache's manifest rebuilds a
    damaged entry instead of serving it. The process's directory holds only the block's executables, so what
    is published is exactly what this entry's calls used."""
    directory = process_xla_directory()
    for path in directory.iterdir():
        path.unlink()
    key = xla_key(stablehlo_entry)
    found = cache.lookup(XLA_KIND, key, count_hit=True)
    for path in found.glob("*.pb") if found is not None else ():
        shutil.copyfile(path, directory / path.name)
    yield
    if found is None and any(directory.iterdir()):
        cache.get_or_build(XLA_KIND, key, lambda out: [shutil.copyfile(path, out / path.name)
                                                       for path in directory.glob("*.pb")])


class StableHLORunner(Runner):
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

    def kv_layers(self, kv) -> KVLayers:
        """Per layer (K, V) as numpy copies, from the flat k0, v0, k1, v1... arguments."""
        return [(np.array(kv[i], copy=True), np.array(kv[i + 1], copy=True)) for i in range(0, len(kv), 2)]

    def kv_from_layers(self, layers: KVLayers):
        return [array for pair in layers for array in pair]

    def call(self, name, tokens, positions, kv):
        outputs = self.lowered[name](tokens, positions, *kv)
        return np.array(outputs[0])[0], [np.array(o) for o in outputs[1:]]
