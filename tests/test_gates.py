import math

import pytest

from harness import stages
from harness.errors import GatesError
from harness.gates import Gate, Gates, judge, load_gates
from harness.pairs import ExpectedFailure
from harness.records import ERROR, FAIL, INFO, XFAIL


def gates_from(tmp_path, text: str) -> Gates:
    path = tmp_path / "gates.toml"
    path.write_text(text)
    return load_gates(path)


def test_default_gates_cover_every_float_stage():
    gates = load_gates()
    for stage in ("reauthored", "exported", "stablehlo", "tflite_float"):
        assert gates.thresholds("any", stage, "logits")["max_max_abs_err"] > 0


def test_model_override_wins_over_default(tmp_path):
    gates = gates_from(tmp_path, "[defaults.exported.logits]\nmax_max_abs_err = 1e-4\nmin_top1 = 1.0\n"
                                 "[models.tiny.exported.logits]\nmax_max_abs_err = 1e-3\n")
    assert gates.thresholds("tiny", "exported", "logits") == {"max_max_abs_err": 1e-3, "min_top1": 1.0}
    assert gates.thresholds("other", "exported", "logits")["max_max_abs_err"] == 1e-4


def test_unknown_recipe_falls_back_to_quantized_defaults(tmp_path):
    gates = gates_from(tmp_path, "[defaults.tflite_quantized.quant_accuracy]\nmax_mean_kl = 0.1\n")
    assert gates.thresholds("m", "tflite_fp16", "quant_accuracy") == {"max_mean_kl": 0.1}


@pytest.mark.parametrize("text, fragment", [
    ("[defaults.exported.logits\n", "not valid TOML"),
    ("[defaults.exported.logits]\nabs_err = 1\n", "must start with max_ or min_"),
    ("[defaults.exported.logits]\nmax_max_abs_err = 'x'\n", "is not a number"),
    ("[default.exported.logits]\nmax_max_abs_err = 1\n", "unknown top-level tables"),
    # Misspelt names would leave a check with no thresholds: each is an error naming the nearest valid name.
    ("[defaults.tflite_dynamic_int8.quant_acuracy]\nmax_mean_kl = 1\n", "did you mean 'quant_accuracy'"),
    ("[defaults.tflite_dynamc_int8.quant_accuracy]\nmax_mean_kl = 1\n", "did you mean 'tflite_dynamic_int8'"),
    ("[defaults.exported.logits]\nmax_max_abs_eror = 1\n", "did you mean 'max_max_abs_err'"),
    ("[defaults.exported.quant_accuracy]\nmax_mean_kl = 1\n", "is not a check of stage exported"),
    ("[models.tiny.tflite_float.logits]\nmax_mean_kl = 1\n", "logits measures no metric 'mean_kl'"),
])
def test_bad_gates_files_are_clear_errors(tmp_path, text, fragment):
    with pytest.raises(GatesError, match=fragment):
        gates_from(tmp_path, text)


def test_a_misspelt_model_override_is_an_error_naming_the_pair(tmp_path):
    gates = gates_from(tmp_path, "[models.tiny_lama.reauthored.logits]\nmax_max_abs_err = 1e-3\n")
    with pytest.raises(GatesError, match="did you mean 'tiny_llama'"):
        gates.require_models(["tiny_llama", "phi2"])
    gates.require_models(["tiny_lama"])  # the same table for a pair of that name is fine


def test_the_shipped_gates_name_only_known_pairs(pairs):
    load_gates().require_models(pairs)


def test_missing_gates_file(tmp_path):
    with pytest.raises(GatesError, match="does not exist"):
        load_gates(tmp_path / "nope.toml")


def test_judge_semantics():
    assert judge({"a": 1.0, "b": 5}, {"max_a": 1.0, "min_b": 5}) == []
    assert judge({"a": 1.1}, {"max_a": 1.0}) == ["a=1.1 > 1"]
    assert judge({"b": 4}, {"min_b": 5}) == ["b=4 < 5"]
    assert judge({"a": math.nan}, {"max_a": 1.0})
    assert "was not measured" in judge({}, {"max_a": 1.0})[0]


def test_a_gated_check_with_no_threshold_is_an_error_not_a_pass():
    status, reasons = Gate({}).judge({"mean_kl": 9.0, "top1": 0.0})
    assert status == ERROR and "not judged is not a pass" in reasons[0]


def test_an_informational_record_is_info_never_pass():
    assert Gate({}, informational=True).judge({"identical": 0.0})[0] == INFO
    # given a threshold, the same record is judged
    assert Gate({"min_identical": 1.0}, informational=True).judge({"identical": 0.0})[0] == FAIL


DEFECT = ExpectedFailure(name="KNOWN", reason="a known upstream defect", stage=stages.STABLEHLO,
                         check=stages.COMPOSITE_BODY, band={"max_abs_err": (2e-4, 2e-3)})


@pytest.mark.parametrize("value, status, fragment", [
    (7e-4, XFAIL, "within the band of declared upstream defect KNOWN"),
    (0.9, FAIL, "outside the band of declared defect KNOWN"),  # worse than declared: not excused
    (1.5e-4, FAIL, "outside the band"),  # fails its gate, but below the band: not the declared defect
    (1e-6, FAIL, "did not show"),  # the defect is gone: its declaration must go too
])
def test_a_declared_defect_excuses_only_values_inside_its_band(value, status, fragment):
    got, reasons = Gate({"max_max_abs_err": 1e-4}, DEFECT).judge({"max_abs_err": value})
    assert got == status and fragment in "; ".join(reasons)


def test_a_declared_defect_never_excuses_another_metric():
    got, reasons = Gate({"max_max_abs_err": 1e-4, "min_top1": 1.0}, DEFECT).judge({"max_abs_err": 7e-4, "top1": 0.5})
    assert got == FAIL and "top1=0.5 < 1" in reasons


def test_a_declaration_for_a_check_that_does_not_exist_is_refused(tiny_llama):
    import dataclasses

    from harness.errors import HarnessError

    for bad, fragment in ((dict(check="logit"), "does not run at stage"), (dict(band={"abs_err": (0, 1)}),
                                                                            "not measured by"),
                          (dict(stage="stablehlo2"), "is not a stage")):
        with pytest.raises(HarnessError, match=fragment):
            dataclasses.replace(tiny_llama, expected_failures=(dataclasses.replace(DEFECT, **bad),))


def test_the_real_model_judges_every_recipe_on_real_text_by_its_own_budget():
    from harness.pairs import discover

    gates, pair = load_gates(), discover()["gemma3_270m_real"]
    budgets = {recipe: gates.thresholds(pair.name, stages.tflite_stage(recipe), stages.PERPLEXITY)
               for recipe in pair.quant_recipes}
    assert set(pair.quant_recipes) == set(stages.QUANT_RECIPES)
    assert all(b.keys() == {"max_ppl_ratio_vs_hf", "max_mean_kl", "max_p99_kl", "min_top1"} for b in budgets.values())
    # A coarser recipe may cost more, never less: the budgets are ordered as the recipes are.
    order = ["fp16", "weight_only_int8", "dynamic_int8", "dynamic_int4_block32", "dynamic_int4_block128"]
    ratios = [budgets[r]["max_ppl_ratio_vs_hf"] for r in order]
    assert ratios == sorted(ratios)


def test_every_gated_metric_of_a_run_is_in_the_catalogue_and_measured(tiny_llama_report):
    """The catalogue the gates file is validated against names what the checks really measure."""
    for r in tiny_llama_report.results:
        if r.check in stages.GATED_METRICS:
            assert r.stage in stages.CHECKS_AT and r.check in stages.CHECKS_AT[r.stage], (r.stage, r.check)
            assert {k[4:] for k in r.threshold} <= set(r.metrics), (r.stage, r.check)
