"""The matched points inside the lowered StableHLO: the exported program cut open at module boundaries.

torch.export keeps each node's module stack (`nn_module_stack`), so a re-authored module path names the
nodes it computed: its output is the last of them that a node outside it uses, its input the first
activation from outside that one of them reads. A copy of the program returns those nodes after its own
outputs; it goes through the converter's FX passes and lowering as the stage's program does (composites
resolved the same way), and XlaCallModule returns every point beside the logits. The parent's values are the same
nodes of the uncut program, run by torch (an FX interpreter over `ExportedProgram.module()`), so both sides
read one tensor by construction. RoPE inside the attention is no module of its own: q/k after RoPE are left
out, as on the exported side.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from harness.divergence import Point, as_rows

LOGITS = "logits"


def _stack(node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


@dataclasses.dataclass(frozen=True)
class Cut:
    """Which node of the program each point reads, and how (`as_rows`'s take)."""

    nodes: dict[str, str]  # point name -> FX node name
    takes: dict[str, str]  # point name -> take


def _wrapper(nodes) -> str:
    """The converter's wrapper around the model in module paths, e.g. "module."."""
    return next(path[:-len("tok_embedding")] for node in nodes for path in _stack(node)
                if path.endswith("tok_embedding"))


def find_nodes(program, points: list[Point]) -> Cut:
    """The node of every point the program computes readably (q/k after RoPE and unknown modules left out)."""
    graph = program.graph
    nodes = list(graph.nodes)
    user_inputs = set(program.graph_signature.user_inputs)
    wrapper = _wrapper(nodes)
    found, takes = {}, {}
    for point in points:
        if point.take == LOGITS:
            output = next(n for n in nodes if n.op == "output")
            found[point.name], takes[point.name] = output.args[0][0].name, "output"
            continue
        if point.take.endswith("_rope"):
            continue
        path = wrapper + point.reauthored
        inside = [n for n in nodes if path in _stack(n)]
        if point.take == "input":
            node = next((a for n in inside for a in n.all_input_nodes
                         if path not in _stack(a) and (a.op != "placeholder" or a.name in user_inputs)), None)
        else:
            node = next((n for n in reversed(inside) if any(path not in _stack(u) for u in n.users)), None)
        if node is not None:
            found[point.name], takes[point.name] = node.name, point.take
    return Cut(found, takes)


def cut_program(program, points: Cut):
    """A new program, `program`'s graph copied (the original untouched), that also returns every point's node
    after its own outputs."""
    import torch
    import torch.utils._pytree as pytree
    from torch.export.graph_signature import ExportGraphSignature, OutputKind, OutputSpec, TensorArgument

    graph, copied = torch.fx.Graph(), {}
    outputs = graph.graph_copy(program.graph, copied)  # nodes copied, meta shared: no tensor is copied
    by_name = {old.name: new for old, new in copied.items()}
    extra = [by_name[name] for name in points.nodes.values()]
    graph.output(tuple(outputs) + tuple(extra))
    signature = ExportGraphSignature(
        program.graph_signature.input_specs,
        [*program.graph_signature.output_specs,
         *(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None) for n in extra)])
    # A shallow copy with the new graph: a new ExportedProgram would be verified, and the converter's export
    # leaves call targets (plain functions) the verifier refuses; the lowering takes them as they are.
    cut = copy.copy(program)
    cut._graph_module = torch.fx.GraphModule(program.graph_module, graph)
    cut._graph_signature = signature
    cut._module_call_graph = copy.deepcopy(program._module_call_graph)
    cut._state_dict, cut._constants = dict(program.state_dict), dict(program.constants)  # dicts of its own
    flat = pytree.tree_structure(tuple(range(len(outputs) + len(extra))))  # the outputs as one flat tuple
    for entry in cut._module_call_graph:
        if entry.fqn == "" and entry.signature is not None:
            entry.signature.out_spec = flat
            entry.signature.outputs.extend(TensorArgument(n.name) for n in extra)
    return cut


def exported_values(program, cut: Cut, flat_inputs) -> dict:
    """The uncut program's value at every point's node, run by torch: node name -> tensor."""
    import torch

    wanted, recorded = set(cut.nodes.values()), {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in wanted:
                recorded[node.name] = value
            return value

    with torch.no_grad():
        Recorder(program.module()).run(*(torch.as_tensor(x) for x in flat_inputs))
    return recorded


def kv_shapes(program) -> list[tuple[int, ...]]:
    """The program's KV-cache inputs' shapes, after tokens and input_pos."""
    user_inputs = program.graph_signature.user_inputs
    shapes = {n.name: tuple(n.meta["val"].shape) for n in program.graph.nodes if n.op == "placeholder"}
    return [shapes[name] for name in user_inputs[2:]]


def stablehlo_values(program, points: list[Point], padded, positions, layout: dict, inline_weights: bool):
    """Every point's values in the exported program and in its StableHLO on one prefill: (exported, stablehlo),
    each point name -> [position, features]."""
    import torch

    from harness.lowering import lower_programs

    cut = find_nodes(program, points)
    kv = [np.zeros(shape, np.float32) for shape in kv_shapes(program)]
    inputs = [padded, positions, *kv]
    parent = exported_values(program, cut, inputs)
    lowered, _, _ = lower_programs({"cut": cut_program(program, cut)}, inline_weights=inline_weights)
    outputs = lowered["cut"](*inputs)
    extra = outputs[len(outputs) - len(cut.nodes):]

    def rows(value, name):
        return as_rows(torch.as_tensor(np.array(value)), cut.takes[name], layout)

    return ({name: rows(parent[node], name) for name, node in cut.nodes.items()},
            {name: rows(value, name) for name, value in zip(cut.nodes, extra)})
