"""StableHLO localisation (harness/stablehlo_points.py): the exported program cut open at module boundaries,
lowered as the stage lowers it and run by XlaCallModule, against the same nodes run by torch."""

from pathlib import Path

import pytest

from harness import explain, localise, stages
from harness.divergence import pair_points
from harness.pairs import scan
from harness.pipeline import verify_pair
from harness.stablehlo_points import cut_program, find_nodes

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ROOT / "tests" / "fixtures" / "planted_defects"


def built(pair, cache):
    """Both sides on prompt 0, the exported programs the stage ran (the cache's), as `harness explain` has them."""
    return explain.rebuild(pair, 0, stages.EXPORTED, cache)


@pytest.mark.parametrize("name", ["tiny_llama", "gemma3", "phi3"])  # plain, scaled embedding + QK norm, fused qkv
def test_a_clean_lowering_diverges_nowhere_at_every_module_boundary(name, pairs, cache, gates):
    pair = pairs[name]
    sides = built(pair, cache)
    model = sides.model
    points = pair_points(pair, model)
    divergence = localise.localise_stablehlo(pair, model, sides.programs, sides.tokens,
                                             localise.tolerance(gates, pair, stages.STABLEHLO))
    assert divergence.first is None, localise.describe(divergence)
    matched = {e.point.name for e in divergence.errors}
    # Every point but q/k after RoPE (no module of its own in a traced program) is matched.
    assert matched == {p.name for p in points if not p.take.endswith("_rope")}, matched
    assert all(0 <= e.error < divergence.tolerance / 10 for e in divergence.errors)


def test_each_point_reads_the_node_its_module_computed_last_or_took_first(tiny_llama, cache):
    sides = built(tiny_llama, cache)
    model, program = sides.model, sides.programs["prefill_8"]
    cut = find_nodes(program, pair_points(tiny_llama, model))
    nodes = {n.name: n for n in program.graph.nodes}
    output = next(n for n in program.graph.nodes if n.op == "output")
    assert nodes[cut.nodes["logits"]] is output.args[0][0]
    assert nodes[cut.nodes["embedding"]].target.__name__.startswith("embedding")
    down_input = nodes[cut.nodes["layers.1.mlp.activation"]]  # gate and up multiplied: outside the Linear
    assert "module.transformer_blocks.1.ff.w2" not in str(down_input.meta["nn_module_stack"])
    assert "mul" in down_input.target.__name__, down_input.target
    assert cut.takes["layers.0.attention.k"] == "k"  # split from the fused projection as the hooks split it
    cut_open = cut_program(program, cut)
    assert len(cut_open.graph_signature.output_specs) == 5 + len(cut.nodes)  # logits, 4 KV tensors, the points
    assert len(program.graph_signature.output_specs) == 5  # the stage's own program is untouched
    assert len(next(n for n in program.graph.nodes if n.op == "output").args[0]) == 5


def test_a_lowering_only_defect_is_localised_at_stablehlo_and_only_there(options):
    """A custom op lowered x1.05 after layer 1's MLP down-projection (tests/variants.LoweredScaledLinear): eager
    and exported agree with HF, StableHLO diverges at layers.1.mlp.down, every earlier point clean."""
    pair = scan((PLANTED,))[0]["tiny_llama_lowered_wrong"]
    rep = verify_pair(pair, options.derive(stages=(stages.STABLEHLO,)))
    status = {(r.stage, r.check): r.status for r in rep.results}
    assert status[(stages.EXPORTED, stages.LOGITS)] == "pass" and status[(stages.STABLEHLO, stages.LOGITS)] == "fail"
    records = [r for r in rep.results if r.check == stages.DIVERGENCE]
    assert [r.stage for r in records] == [stages.STABLEHLO], [(r.stage, r.check, r.status) for r in rep.results]
    metrics = records[0].metrics
    assert (metrics["point"], metrics["position"]) == ("layers.1.mlp.down", 0), records[0].message
    assert metrics["error"] == pytest.approx(0.05, rel=1e-3)  # the planted 5%, exactly
    names = list(metrics["points"])
    before = [metrics["points"][n] for n in names[:names.index("layers.1.mlp.down")]]
    assert len(before) >= 20 and max(before) < metrics["tolerance"]
    assert records[0].message.startswith("first divergence: stablehlo, layer 1 MLP down projection, position 0")
