"""Where a quantized stage's cost comes from (harness/quant_rank.py): the recipe reproduces the converter's
flatbuffer, and one layer quantized far too coarsely is ranked first, by the divergence step of a failing run
and by `harness explain --stage tflite_dynamic_int8`."""

import numpy as np
import pytest

from harness import cli, quant_rank, stages, summary
from harness.convert import quantizer_recipe
from harness.pipeline import verify_pair
from harness.records import FAIL, INFO, PASS

STAGE = stages.tflite_stage("dynamic_int8")


def coarse_layer_1_down(monkeypatch):
    """litert-torch's recipes, plus one entry: layer 1's MLP down projection at int4, one scale per tensor
    (found by its tensor names, independently of harness/tflite_points.py), the rest as the recipe says."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from litert_torch.quantize import translate_recipe

    translate = translate_recipe.translate_to_ai_edge_recipe

    def planted(recipe):
        rm = recipe_manager.RecipeManager()
        rm.add_quantization_config(
            regex=r"TransformerBlock_1/.*Linear_w2;", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            op_config=qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(
                    num_bits=4, symmetric=True, granularity=qtyping.QuantGranularity.TENSORWISE,
                    dtype=qtyping.TensorDataType.INT),
                compute_precision=qtyping.ComputePrecision.INTEGER, explicit_dequantize=False),
            algorithm_key="min_max_uniform_quantize")
        return translate(recipe) + rm.get_quantization_recipe()

    monkeypatch.setattr(translate_recipe, "translate_to_ai_edge_recipe", planted)


def test_the_recipe_requantizes_the_float_flatbuffer_into_the_stages_own(tiny_llama_report, tiny_llama):
    """quant_rank quantizes as the converter does: the same recipe on the float flatbuffer gives the stage's
    logits exactly, so a group quantized alone is the stage's own quantization of that group."""
    state = tiny_llama_report.state
    recipe = quantizer_recipe(state.model, "dynamic_int8")
    logits = quant_rank.quantized_logits(state.artifacts[stages.TFLITE_FLOAT].read_bytes(), recipe, tiny_llama,
                                         state.trajectories)
    for ours, stage in zip(logits, state.logits[STAGE], strict=True):
        np.testing.assert_array_equal(ours, stage)


def test_groups_are_every_linear_and_the_embedding_named_by_their_points(tiny_llama_report):
    from harness.divergence import pair_points

    state = tiny_llama_report.state
    names = [name for name, _, _ in quant_rank.groups(state.model, pair_points(state.pair, state.model))]
    per_layer = ["attention.qkv", "attention.projection", "mlp.gate", "mlp.down", "mlp.up"]
    assert sorted(names) == sorted(["embedding", "head", *(f"layers.{i}.{g}" for i in range(2) for g in per_layer)])


def test_one_layer_quantized_too_coarsely_is_ranked_first_by_the_divergence_step(tiny_llama, private_conversion,
                                                                                  monkeypatch):
    coarse_layer_1_down(monkeypatch)
    rep = verify_pair(tiny_llama, private_conversion.derive(quant=("dynamic_int8",), stages=(STAGE,)))
    by_check = {(r.stage, r.check): r for r in rep.results}
    assert by_check[(stages.TFLITE_FLOAT, stages.LOGITS)].status == PASS
    assert by_check[(STAGE, stages.QUANT_ACCURACY)].status == FAIL, by_check[(STAGE, stages.QUANT_ACCURACY)].message
    records = [r for r in rep.results if r.check == stages.DIVERGENCE]
    assert [(r.stage, r.status) for r in records] == [(STAGE, INFO)]
    metrics = records[0].metrics
    assert (metrics["point"], metrics["layer"]) == ("layers.1.mlp.down", 1), records[0].message
    ranking = list(metrics["ranking"].values())
    assert len(ranking) == 12 and ranking[0] > 3 * ranking[1]  # far ahead of the next group
    assert records[0].message.startswith(f"quantization cost: {STAGE}, mean KL ")
    assert "mostly layer 1 MLP down projection (" in records[0].message
    line = summary.divergence_line({"stage": STAGE, "metrics": metrics})
    assert line.startswith(f"quantization cost: {STAGE}") and "mostly layer 1 MLP down projection" in line


def test_explain_ranks_a_quantized_stage_on_demand(tmp_path, capsys):
    """The clean int8 recipe, within its budget: every group's share printed, exit 0, the table written."""
    code = cli.main(["explain", "--models", "tiny_llama", "--stage", STAGE, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith(("layers.", "head",
                                                                                                     "embedding"))}
    assert len(rows) == 12 and all(v >= 0 for v in rows.values()) and max(rows.values()) > 0
    assert f"quantization cost: {STAGE}, mean KL " in out
    assert (tmp_path / f"ranking_tiny_llama_{STAGE}.txt").read_text().startswith("quantization cost:")


@pytest.mark.parametrize("stage, fragment", [("tflite_fp8", "--stage tflite_fp8 is not a stage")])
def test_an_unknown_recipe_is_refused(stage, fragment, tmp_path, capsys):
    assert cli.main(["explain", "--models", "tiny_llama", "--stage", stage, "--out", str(tmp_path)]) == 2
    assert fragment in capsys.readouterr().err
