"""StableHLO localisation (harness/stablehlo_points.py): the exported program cut open at module boundaries,
lowered as the stage lowers it and run by XlaCallModule, against the same nodes run by torch."""

from pathlib import Path

import pytest

from harness import localise, stages
from harness.checkpoint import build_reauthored, load_hf, reference_checkpoint
from harness.divergence import pair_points
from harness.lowering import converter_signatures, export_programs
from harness.pairs import scan
from harness.pipeline import verify_pair
from harness.stablehlo_points import cut_program, find_nodes
from harness.workload import greedy_trajectory, make_prompts

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ROOT / "tests" / "fixtures" / "planted_defects"


def built(pair, cache):
    checkpoint = reference_checkpoint(pair, cache)
    hf_model = load_hf(pair, checkpoint)
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    programs = export_programs(converter_signatures(model, pair.export.prefill_lens, pair.export.kv_cache_max))
    return hf_model, model, programs


@pytest.mark.parametrize("name", ["tiny_llama", "gemma3", "phi3"])  # plain, scaled embedding + QK norm, fused qkv
def test_a_clean_lowering_diverges_nowhere_at_every_module_boundary(name, pairs, cache, gates):
    pair = pairs[name]
    hf_model, model, programs = built(pair, cache)
    points = pair_points(pair, model)
    trajectory, _ = greedy_trajectory(hf_model, make_prompts(pair)[0], pair.workload.new_tokens)
    divergence = localise.localise_stablehlo(pair, model, programs, trajectory.tokens[:-1],
                                             localise.tolerance(gates, pair, stages.STABLEHLO))
    assert divergence.first is None, localise.describe(divergence)
    matched = {e.point.name for e in divergence.errors}
    # Every point but q/k after RoPE (no module of its own in a traced program) is matched.
    assert matched == {p.name for p in points if not p.take.endswith("_rope")}, matched
    assert all(0 <= e.error < divergence.tolerance / 10 for e in divergence.errors)


def test_each_point_reads_the_node_its_module_computed_last_or_took_first(tiny_llama, cache):
    _, model, programs = built(tiny_llama, cache)
    program = programs["prefill_8"]
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
