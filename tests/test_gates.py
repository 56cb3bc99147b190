import math

import pytest

from harness.errors import GatesError
from harness.gates import judge, load_gates, thresholds_for


def test_default_gates_cover_every_float_stage():
    gates = load_gates()
    for stage in ("reauthored", "exported", "stablehlo", "tflite_float"):
        assert thresholds_for(gates, "any", stage, "logits")["max_max_abs_err"] > 0


def test_model_override_wins_over_default(tmp_path):
    path = tmp_path / "gates.toml"
    path.write_text("[defaults.exported.logits]\nmax_max_abs_err = 1e-4\nmin_top1 = 1.0\n"
                    "[models.tiny.exported.logits]\nmax_max_abs_err = 1e-3\n")
    gates = load_gates(path)
    assert thresholds_for(gates, "tiny", "exported", "logits") == {"max_max_abs_err": 1e-3, "min_top1": 1.0}
    assert thresholds_for(gates, "other", "exported", "logits")["max_max_abs_err"] == 1e-4


def test_unknown_recipe_falls_back_to_quantized_defaults(tmp_path):
    path = tmp_path / "gates.toml"
    path.write_text("[defaults.tflite_quantized.quant_accuracy]\nmax_mean_kl = 0.1\n")
    assert thresholds_for(load_gates(path), "m", "tflite_fp16", "quant_accuracy") == {"max_mean_kl": 0.1}


@pytest.mark.parametrize("text, fragment", [
    ("[defaults.exported.logits\n", "not valid TOML"),
    ("[defaults.exported.logits]\nabs_err = 1\n", "must start with max_ or min_"),
    ("[defaults.exported.logits]\nmax_abs_err = 'x'\n", "is not a number"),
    ("[default.exported.logits]\nmax_abs_err = 1\n", "unknown top-level tables"),
])
def test_bad_gates_files_are_clear_errors(tmp_path, text, fragment):
    path = tmp_path / "gates.toml"
    path.write_text(text)
    with pytest.raises(GatesError, match=fragment):
        load_gates(path)


def test_missing_gates_file(tmp_path):
    with pytest.raises(GatesError, match="does not exist"):
        load_gates(tmp_path / "nope.toml")


def test_judge_semantics():
    assert judge({"a": 1.0, "b": 5}, {"max_a": 1.0, "min_b": 5}) == []
    assert judge({"a": 1.1}, {"max_a": 1.0}) == ["a=1.1 > 1"]
    assert judge({"b": 4}, {"min_b": 5}) == ["b=4 < 5"]
    assert judge({"a": math.nan}, {"max_a": 1.0})
    assert "was not measured" in judge({}, {"max_a": 1.0})[0]


def test_the_real_model_judges_every_recipe_on_real_text_by_its_own_budget():
    from harness import stages
    from harness.pairs import discover
    from harness.realtext import PERPLEXITY

    gates, pair = load_gates(), discover()["gemma3_270m_real"]
    budgets = {recipe: thresholds_for(gates, pair.name, stages.tflite_stage(recipe), PERPLEXITY)
               for recipe in pair.quant_recipes}
    assert set(pair.quant_recipes) == set(stages.QUANT_RECIPES)
    assert all(b.keys() == {"max_ppl_ratio_vs_hf", "max_mean_kl", "max_p99_kl", "min_top1"} for b in budgets.values())
    # A coarser recipe may cost more, never less: the budgets are ordered as the recipes are.
    order = ["fp16", "weight_only_int8", "dynamic_int8", "dynamic_int4_block32", "dynamic_int4_block128"]
    ratios = [budgets[r]["max_ppl_ratio_vs_hf"] for r in order]
    assert ratios == sorted(ratios)
