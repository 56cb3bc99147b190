"""The matched points inside a flatbuffer: intermediate tensors of the interpreter, found by module scope.

The converter names every tensor after the module scope that computed it ("<class>_<attribute>/..." from
the wrapper down, a ModuleList contributing nothing but its index), so a re-authored module path gives the
scope to look in. The interpreter runs as the stage runs it (XNNPack) with every tensor preserved, which
keeps the delegate's intermediates readable; the builtin kernels alone are not the stage's run (gemma3's
flatbuffer without XNNPack departs from it by up to 14 in the logits from position 1, measured 2026-11-25).
The flatbuffer's operators, in execution order, say which tensor a scope
produced last (its output) and which non-constant tensor entered it first (its input). A point whose scope
computes nothing readable as [position, features] (the fused q/k/v projection, RoPE inside the attention
scope) is left out, as `compare` leaves out what one side lacks.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from harness.divergence import Point

_CONTAINERS = ("ModuleList", "ModuleDict")  # never called: no scope of their own


def scope_of(model, path: str) -> str:
    """The converter's scope of module `path` below the model, e.g. "<pkg>.TransformerBlock_0/<pkg>.RMSNorm_pre_atten_norm"."""
    segments, at = [], model
    for part in path.split("."):
        at = getattr(at, part) if not part.isdigit() else at[int(part)]
        if type(at).__name__ not in _CONTAINERS:
            segments.append(f"{type(at).__module__}.{type(at).__qualname__}_{part}")
    return "/".join(segments)


@dataclasses.dataclass(frozen=True)
class Graph:
    """One signature's subgraph: tensor names and shapes, and its operators' (inputs, outputs) in order."""

    index: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    constant: set[int]
    operators: list[tuple[list[int], list[int]]]

    def scope(self, tensor: int) -> str:
        return self.names[tensor].split(";", 1)[0]


def read_graph(path: Path, signature: str) -> Graph:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    index = next(s.subgraphIndex for s in model.signatureDefs
                 if (s.signatureKey.decode() if isinstance(s.signatureKey, bytes) else s.signatureKey) == signature)
    graph = model.subgraphs[index]
    names = [t.name.decode() if isinstance(t.name, bytes) else t.name for t in graph.tensors]
    constant = {i for i, t in enumerate(graph.tensors)
                if t.buffer and model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)}
    return Graph(index, names, [tuple(int(d) for d in t.shape) for t in graph.tensors], constant,
                 [(list(op.inputs), list(op.outputs)) for op in graph.operators])


def positions_first(shape: tuple[int, ...], length: int) -> int | None:
    """The axis a tensor holds positions on, read as [position, ...]: [1, length, ...] (batch first) or
    [length, ...] (a Linear whose converter dropped the batch, as phi2's); None when it is neither."""
    if len(shape) >= 2 and shape[:2] == (1, length):
        return 1
    return 0 if len(shape) >= 2 and shape[0] == length else None


def find_tensor(graph: Graph, scope: str, take: str, length: int, size: int, linear: bool = False) -> int | None:
    """The tensor of a point: the last one its scope produces (take "output") or the first non-constant one
    entering its scope (take "input"), positions first (`positions_first`) with `size` elements; None if none.
    A Linear's output must come from an operator holding the Linear's own weights: where the converter folded
    a caller's constant into them (gemma2's head, divided by the soft-cap), its product is not the module's."""
    def fits(t):
        return positions_first(graph.shapes[t], length) is not None and int(np.prod(graph.shapes[t])) == size

    def inside(t):
        return graph.scope(t).endswith("/" + scope)

    if take == "output":
        found = [t for inputs, outputs in graph.operators for t in outputs if inside(t) and fits(t)
                 and (not linear or any(i in graph.constant and inside(i) for i in inputs))]
        return found[-1] if found else None
    if take == "input":
        first = next((inputs for inputs, outputs in graph.operators if any(inside(t) for t in outputs)), None)
        return next((t for t in first or () if t >= 0 and t not in graph.constant and fits(t)), None)
    return None


def tflite_values(path: Path, model, points: list[Point], padded: np.ndarray, positions: np.ndarray,
                  features: dict[str, int]) -> dict[str, np.ndarray]:
    """Every point the flatbuffer's prefill signature computes readably, on `padded` tokens, as [position,
    features] over all its positions; `features` gives each point's width (the re-authored side's)."""
    from ai_edge_litert import interpreter as litert

    length = padded.shape[1]
    signature = f"prefill_{length}"
    with warnings.catch_warnings():  # "intended for debugging purposes only": that is the purpose
        warnings.simplefilter("ignore", UserWarning)
        interpreter = litert.Interpreter(model_path=str(path), num_threads=1, experimental_preserve_all_tensors=True)
    runner = interpreter.get_signature_runner(signature)
    kv = {name: np.zeros(d["shape"], d["dtype"]) for name, d in runner.get_input_details().items()
          if name.startswith("kv_cache_")}  # an empty cache, as every prefill from position 0 starts
    out = runner(tokens=padded, input_pos=positions, **kv)
    graph = read_graph(path, signature)
    values = {}
    for p in points:
        if p.name not in features:
            continue
        if p.take == "logits":
            values[p.name] = np.asarray(out["logits"], np.float64)[0].reshape(length, -1)
            continue
        if p.take not in ("output", "input"):
            continue
        linear = type(model.get_submodule(p.reauthored)).__name__ == "Linear"
        tensor = find_tensor(graph, scope_of(model, p.reauthored), p.take, length, length * features[p.name], linear)
        if tensor is not None:
            value = np.asarray(interpreter.get_tensor(tensor, graph.index), np.float64)
            values[p.name] = (value[0] if positions_first(value.shape, length) == 1 else value).reshape(length, -1)
    return values
