"""The exported stage's torch.export programs, cached like the other artifacts (~4.5 s of export a tiny pair,
~50-65 s the real Gemma 3 270M).

torch.export.save refuses two things litert-torch puts in its programs: the attribute tuples of its
`mark_tensor` nodes, and the pytree context of its KVCache in the programs' input and output specs. So a
program is saved without them (each attribute replaced by its node's name, the specs with the KVCache as a
plain list, no example inputs, which hold a KVCache too); they go beside it, pickled, and loading puts them
back. Nor does an entry hold the model's weights (a real model's GiBs, once per signature): a program reads
the exported module's own parameters and buffers, so it is saved with those as meta tensors and read back
with the module's, as a fresh export has them (the entry's key holds the weights' digest). A loaded program
has the same code, node names, module stacks, graph signature and weights, and computes the same outputs to
the bit (tests/test_programs.py).
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.paths import display_path

PROGRAMS_KIND = "exported"  # the cache's kind for exported programs
_EXTRAS = "extras.pkl"  # per program: its module call graph's specs and its example inputs


def _mark_tensor():
    from litert_torch.backend.composite import mark_tensor

    return mark_tensor.mark_tensor_op


def _plain(spec):
    """A pytree spec with litert-torch's KV cache nodes as lists: what torch.export.save can write."""
    from litert_torch.generative.layers import kv_cache
    from torch.utils import _pytree as pytree

    if spec is None or spec.is_leaf():
        return spec
    children = [_plain(child) for child in spec.children()]
    if spec.type in (kv_cache.KVCache, kv_cache.KVCacheEntry):
        return pytree.TreeSpec(list, None, children)
    return pytree.TreeSpec(spec.type, spec.context, children)


def _module_tensors(module) -> dict[str, torch.Tensor]:
    """The exported module's parameters and buffers by name, as its programs' state dicts name them."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def is_own(tensor: torch.Tensor, own: torch.Tensor | None) -> bool:
    """Whether `tensor` is `own` itself (same storage, shape and dtype): a weight an entry may leave out."""
    return (own is not None and own.data_ptr() == tensor.data_ptr() and own.shape == tensor.shape
            and own.dtype == tensor.dtype)


def weights_read_back(entry: Path, what: str, wanted: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights an entry was saved without (`wanted`: name -> shape and dtype), taken from `own`, the tensors
    they were saved from; one that is missing or shaped otherwise means a damaged or foreign entry."""
    found = {}
    for key, (shape, dtype) in wanted.items():
        tensor = own.get(key)
        if tensor is None or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise HarnessError(f"cache entry {display_path(entry)}: {what} reads weight {key} {tuple(shape)}, which "
                               "the model lacks or shapes otherwise; delete the entry so it is built again")
        found[key] = tensor
    return found


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = tensor.detach().to("meta")
    return torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta


@contextlib.contextmanager
def _saveable(program, module):
    """The program as torch.export.save can write it, restored when the block ends; yields what loading restores."""
    mark, signatures = _mark_tensor(), [e.signature for e in program.module_call_graph if e.signature is not None]
    nodes = [(node, node.args) for node in program.graph.nodes
             if node.target is mark and len(node.args) > 5 and node.args[5] is not None]
    own = _module_tensors(module)
    weights = {key: tensor for key, tensor in program.state_dict.items() if is_own(tensor, own.get(key))}
    extras = {"attrs": {node.name: args[5] for node, args in nodes}, "weights": sorted(weights),
              "specs": [(s.in_spec, s.out_spec) for s in signatures], "example_inputs": program.example_inputs}
    try:
        for node, args in nodes:
            node.args = (*args[:5], node.name)
        for s in signatures:
            s.in_spec, s.out_spec = _plain(s.in_spec), _plain(s.out_spec)
        program.example_inputs = None
        for key, tensor in weights.items():
            program.state_dict[key] = _meta(tensor)
        yield extras
    finally:
        for node, args in nodes:
            node.args = args
        for s, (in_spec, out_spec) in zip(signatures, extras["specs"]):
            s.in_spec, s.out_spec = in_spec, out_spec
        program.example_inputs = extras["example_inputs"]
        program.state_dict.update(weights)


def save_programs(out: Path, programs: dict[str, torch.export.ExportedProgram], modules: dict[str, Any]) -> None:
    """Each program as <name>.pt2, without its module's weights (`modules`: the exported module by program), with
    what torch.export.save cannot write in extras.pkl."""
    extras = {}
    for name, program in programs.items():
        with _saveable(program, modules[name]) as extras[name]:
            torch.export.save(program, Path(out) / f"{name}.pt2")
    (Path(out) / _EXTRAS).write_bytes(pickle.dumps(extras))


class _SchemaDecoders:
    """torch.export's `_dict_to_dataclass` (the JSON of a program into its schema's dataclasses) with each type's
    questions answered once. The original asks them of the same few schema types again at every one of a graph's
    hundreds of thousands of values: its type hints (pytorch/pytorch#196452, 11 s of the real Gemma 3 270M's 26 s
    of loading its three programs), then its origin, its fields and whether it is a union, still half of what is
    left. Here each type gets a decoder made once, which does what the original does for that type, in its order:
    the dataclasses it returns are equal to the original's (tests/test_programs.py)."""

    def __init__(self, serialize):
        self._serialize, self._decoders = serialize, {}

    def __call__(self, cls, data):
        return self._decoder(cls)(data)

    def _decoder(self, cls):
        try:
            return self._decoders[cls]
        except KeyError:
            pass
        except TypeError:  # a type that cannot be a dict key: the original, unremembered
            return lambda data: self._make(cls)(data)
        decoder = self._decoders[cls] = self._make(cls)
        return decoder

    def _make(self, cls):
        import dataclasses
        import types
        import typing

        serialize = self._serialize
        cls = serialize._resolve_schema_cls(cls)
        if isinstance(cls, str):
            raise AssertionError(f"Unresolved class type: '{cls}'.")
        origin = typing.get_origin(cls)
        if origin is typing.Annotated:
            return self._decoder(cls.__origin__)
        if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
            members = typing.get_args(cls)

            def optional(data):
                if data is None:
                    return None
                if len(members) != 2:
                    raise AssertionError(f"expected 2 type args, got {len(members)}")
                return self._decoder(members[0])(data)
            return optional
        if isinstance(cls, type) and issubclass(cls, serialize._Union):
            hints = typing.get_type_hints(cls, globalns=vars(serialize.schema))

            def union(data):
                if not isinstance(data, dict):
                    raise AssertionError(f"expected dict, got {type(data).__name__}")
                if len(data) != 1:
                    raise AssertionError(f"expected dict with 1 key, got {len(data)}")
                ((kind, value),) = data.items()
                if not isinstance(kind, str):
                    raise AssertionError(f"expected str key, got {type(kind).__name__}")
                return cls.create(**{kind: self._decoder(hints[kind])(value)})
            return union
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls, globalns=vars(serialize.schema))
            fields = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]

            def dataclass(data):  # keys the dataclass does not define are ignored, as the original does
                return cls(**{name: self._decoder(hint)(data[name]) for name, hint in fields if name in data})
            return dataclass
        args = typing.get_args(cls)

        def other(data):
            if isinstance(data, list):
                return [self._decoder(args[0])(d) for d in data] if data else data
            if isinstance(data, dict):
                return {k: self._decoder(args[1])(v) for k, v in data.items()}
            return float(data) if cls is float else data
        return other


@functools.cache
def _process_decoders() -> _SchemaDecoders:
    """One set of decoders for the process: the schema's types do not change, so neither do their decoders."""
    from torch._export.serde import serialize

    return _SchemaDecoders(serialize)


@contextlib.contextmanager
def _schema_decoders():
    from torch._export.serde import serialize

    real = serialize._dict_to_dataclass
    serialize._dict_to_dataclass = _process_decoders()
    try:
        yield
    finally:
        serialize._dict_to_dataclass = real


def load_programs(entry: Path, modules: dict[str, Any]) -> dict[str, torch.export.ExportedProgram]:
    """The programs save_programs wrote, as they were, reading `modules`' weights (the exported module by program)."""
    mark, programs = _mark_tensor(), {}
    for name, extras in pickle.loads((Path(entry) / _EXTRAS).read_bytes()).items():
        with _schema_decoders():
            program = torch.export.load(Path(entry) / f"{name}.pt2")
        saved = {key: (program.state_dict[key].shape, program.state_dict[key].dtype) for key in extras["weights"]}
        program.state_dict.update(weights_read_back(entry, f"program {name}", saved, _module_tensors(modules[name])))
        for node in program.graph.nodes:
            if node.target is mark and node.name in extras["attrs"]:
                node.args = (*node.args[:5], extras["attrs"][node.name])
        program.graph_module.recompile()
        signatures = [e.signature for e in program.module_call_graph if e.signature is not None]
        for s, (in_spec, out_spec) in zip(signatures, extras["specs"], strict=True):
            s.in_spec, s.out_spec = in_spec, out_spec
        program.example_inputs = extras["example_inputs"]
        programs[name] = program
    _one_copy_of_each_weight(programs.values())
    return programs


def _one_copy_of_each_weight(programs) -> None:
    """Programs of one export read the same weight tensors (share_weights and memory count on it); read back, each
    file brought its own copy, so equal tensors of the same name become one."""
    first: dict[str, torch.Tensor] = {}
    for program in programs:
        for tensors in (program.state_dict, program.constants):
            for key, tensor in tensors.items():
                seen = first.setdefault(key, tensor)
                if (seen is not tensor and isinstance(tensor, torch.Tensor) and seen.dtype == tensor.dtype
                        and torch.equal(seen, tensor)):
                    tensors[key] = seen


def cached_programs(cache, key: dict, signatures) -> tuple[Path, dict[str, torch.export.ExportedProgram]]:
    """export_programs through the cache: a miss exports and stores; what runs is always what the entry holds, so
    cold and warm runs give the same records. Returns the entry and the programs by signature name."""
    from harness.lowering import export_programs

    modules = {sig.name: sig.module for sig in signatures}
    entry = cache.get_or_build(PROGRAMS_KIND, key, lambda out: save_programs(out, export_programs(signatures), modules))
    return entry, load_programs(entry, modules)
