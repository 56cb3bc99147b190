"""What XNNPack takes over in each signature, and how many weight bytes a decode step reads.

ai_edge_litert 2.3.0 exposes the nodes of the primary subgraph only (`_get_ops_details`), and
after delegation that list holds the original nodes plus one DELEGATE node per partition.
A partition's nodes are recovered by walking back from the DELEGATE node's outputs to its
inputs; original nodes in no partition run on the reference kernels. To see every
signature, a copy of the flatbuffer is written with that signature's subgraph moved to
index 0 (every subgraph index in signatures and op options remapped).
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np

from harness.errors import HarnessError

LOOKUP_OPS = ("EMBEDDING_LOOKUP", "GATHER")


def _swap_subgraph_to_front(model, index: int) -> None:
    """Moves subgraph `index` to 0 and subgraph 0 to `index`, remapping every reference."""
    if index == 0:
        return

    def remap(i: int) -> int:
        return {0: index, index: 0}.get(i, i)

    model.subgraphs[0], model.subgraphs[index] = model.subgraphs[index], model.subgraphs[0]
    for sig in model.signatureDefs or []:
        sig.subgraphIndex = remap(sig.subgraphIndex)
    for subgraph in model.subgraphs:
        for op in subgraph.operators or []:
            for options in (op.builtinOptions, getattr(op, "builtinOptions2", None)):
                for attr, value in vars(options).items() if options is not None else ():
                    if "subgraphindex" in attr.lower() and isinstance(value, int):
                        setattr(options, attr, remap(value))


def composite_names(model) -> dict[int, str]:
    """Operator index -> composite name (e.g. odml.scaled_dot_product_attention) in subgraph 0."""
    names = {}
    for i, op in enumerate(model.subgraphs[0].operators or []):
        name = getattr(getattr(op, "builtinOptions2", None), "name", None)
        if name:
            names[i] = name.decode() if isinstance(name, bytes) else str(name)
    return names


def primary_plan(interpreter, composites: dict[int, str] | None = None) -> dict:
    """Delegated and undelegated ops of the primary subgraph, from the DELEGATE nodes' inputs and outputs."""
    ops = interpreter._get_ops_details()  # noqa: SLF001 - the only view of the delegated graph in 2.3.0
    originals = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {int(t): o["index"] for o in originals for t in o["outputs"]}
    by_index = {o["index"]: o for o in originals}
    delegated: set[int] = set()
    partitions = 0
    for node in (o for o in ops if o["op_name"] == "DELEGATE"):
        partitions += 1
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        while stack:
            tensor = stack.pop()
            op = producer.get(tensor)
            if op is None or op in delegated or tensor in boundary:
                continue
            delegated.add(op)
            stack.extend(int(t) for t in by_index[op]["inputs"] if int(t) >= 0)
    composites = composites or {}
    left = collections.Counter(o["op_name"] + (f"({composites[o['index']]})" if o["index"] in composites else "")
                               for o in originals if o["index"] not in delegated)
    return {"ops": len(originals), "delegated": len(delegated), "partitions": partitions,
            "undelegated": dict(sorted(left.items()))}


def delegation(path: Path, threads: int = 1) -> dict:
    """Per signature: ops, ops XNNPack delegated, partitions, and the undelegated ops by type."""
    from ai_edge_litert import interpreter as litert
    from ai_edge_litert.tools import flatbuffer_utils

    signatures = litert.Interpreter(model_path=str(path)).get_signature_list()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in signatures:
            model = flatbuffer_utils.read_model(str(path))
            for buffer in model.buffers:
                # Buffers stored by offset come back as bytes, which Pack writes one byte per Python call
                # (minutes for a 1 GB model); as arrays they are written in one copy.
                if buffer.data is not None and not isinstance(buffer.data, np.ndarray):
                    buffer.data = np.frombuffer(buffer.data, np.uint8)
            index = next((s.subgraphIndex for s in model.signatureDefs
                          if s.signatureKey.decode() == name), None)
            if index is None:
                raise HarnessError(f"flatbuffer {path} names signature {name} but no subgraph runs it")
            _swap_subgraph_to_front(model, index)
            moved = Path(tmp) / f"{name}.tflite"
            flatbuffer_utils.write_model(model, str(moved))
            composites = composite_names(model)
            del model
            interpreter = litert.Interpreter(model_path=str(moved), num_threads=threads)
            interpreter.allocate_tensors()
            result[name] = primary_plan(interpreter, composites)
            del interpreter
    return result


def decode_weight_bytes(path: Path, signature: str = "decode") -> int:
    """Bytes of constant tensors the signature's subgraph reads per call; a lookup table counts one row."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    index = next(model.SignatureDefs(i).SubgraphIndex() for i in range(model.SignatureDefsLength())
                 if model.SignatureDefs(i).SignatureKey().decode() == signature)
    subgraph = model.Subgraphs(index)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    counted: dict[int, float] = {}
    for i in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        opname = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "")
        for position, t in enumerate(op.InputsAsNumpy() if op.InputsLength() else []):
            if t < 0:
                continue
            tensor = subgraph.Tensors(int(t))
            buffer = model.Buffers(tensor.Buffer())
            size = buffer.DataLength() or (buffer.Size() if buffer.Offset() > 1 else 0)
            if not size:
                continue
            rows = tensor.Shape(0) if tensor.ShapeLength() and opname in LOOKUP_OPS and position == (
                1 if opname == "EMBEDDING_LOOKUP" else 0) else 1
            counted[tensor.Buffer()] = max(counted.get(tensor.Buffer(), 0), size / max(rows, 1))
    return int(sum(counted.values()))
