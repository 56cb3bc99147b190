"""What XNNPack takes over (harness.bench.delegation): the graph walk on fakes, then on tiny_llama's flatbuffers."""

from __future__ import annotations

import types

import numpy as np

from harness.bench import delegation


def _op(index, name, inputs, outputs):
    return {"index": index, "op_name": name, "inputs": np.array(inputs), "outputs": np.array(outputs)}


def test_primary_plan_walks_back_from_delegate_outputs():
    ops = [_op(0, "FULLY_CONNECTED", [0, 10], [1]), _op(1, "ADD", [1, 11], [2]),
           _op(2, "STABLEHLO_COMPOSITE", [2], [3]), _op(3, "MUL", [3, 12], [4]),
           _op(4, "DELEGATE", [0, 10, 11], [2]), _op(5, "DELEGATE", [3, 12], [4])]
    interpreter = types.SimpleNamespace(_get_ops_details=lambda: ops)
    plan = delegation.primary_plan(interpreter, {2: "odml.rms_norm"})
    assert plan == {"ops": 4, "delegated": 3, "partitions": 2,
                    "undelegated": {"STABLEHLO_COMPOSITE(odml.rms_norm)": 1}}


def test_swap_subgraph_remaps_every_reference():
    composite = types.SimpleNamespace(decompositionSubgraphIndex=2, name=b"odml.x")
    model = types.SimpleNamespace(
        subgraphs=[types.SimpleNamespace(operators=[], name="a"), types.SimpleNamespace(operators=[], name="b"),
                   types.SimpleNamespace(operators=[types.SimpleNamespace(builtinOptions=None,
                                                                          builtinOptions2=composite)], name="c")],
        signatureDefs=[types.SimpleNamespace(subgraphIndex=0), types.SimpleNamespace(subgraphIndex=2)])
    delegation._swap_subgraph_to_front(model, 2)
    assert [g.name for g in model.subgraphs] == ["c", "b", "a"]
    assert [s.subgraphIndex for s in model.signatureDefs] == [2, 0]
    assert composite.decompositionSubgraphIndex == 0


def test_delegation_of_tiny_llama(bench_artifacts):
    plan = delegation.delegation(bench_artifacts[0].path)
    assert set(plan) == {"decode", *(f"prefill_{n}" for n in bench_artifacts[0].prefill_lens)}
    decode = plan["decode"]
    assert 0 < decode["delegated"] <= decode["ops"] and decode["partitions"] >= 1
    assert "FULLY_CONNECTED" not in decode["undelegated"]
    assert sum(decode["undelegated"].values()) == decode["ops"] - decode["delegated"]


def test_decode_weight_bytes_below_file_size(bench_artifacts):
    for a in bench_artifacts:
        assert 0 < delegation.decode_weight_bytes(a.path) < a.path.stat().st_size
