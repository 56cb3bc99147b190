"""Localisation (harness/divergence.py, harness/localise.py): planted defects are found at the planted point,
clean pairs diverge nowhere, and a failing run carries one divergence record and its summary line."""

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest

from harness import localise, report, stages, summary
from harness.checkpoint import build_reauthored, load_hf, reference_checkpoint
from harness.divergence import points_of
from harness.pairs import scan
from harness.pipeline import verify_pair
from harness.records import INFO
from harness.workload import greedy_trajectory, make_prompts

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = (ROOT / "tests" / "fixtures" / "planted_defects", ROOT / "tests" / "fixtures" / "broken_models")


@pytest.fixture(scope="module")
def all_pairs():
    return scan(FIXTURES)[0]


def localised(pair, cache, gates, prompt=0):
    """The re-authored model of `pair` against HF on its prompt's trajectory, as the divergence check runs it."""
    checkpoint = reference_checkpoint(pair, cache)
    hf_model = load_hf(pair, checkpoint)
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    trajectory, _ = greedy_trajectory(hf_model, make_prompts(pair)[prompt], pair.workload.new_tokens)
    return localise.localise_reauthored(pair, hf_model, model, trajectory.tokens[:-1],
                                        localise.tolerance(gates, pair, stages.REAUTHORED))


def test_points_follow_the_tensor_name_map_in_forward_order():
    names = types.SimpleNamespace(embedding="model.embed", pre_attn_norm="model.layers.{}.ln1",
                                  attn_query_proj="model.layers.{}.attn.q", attn_key_proj="model.layers.{}.attn.k",
                                  attn_value_proj="model.layers.{}.attn.v", attn_output_proj="model.layers.{}.attn.o",
                                  ff_up_proj="model.layers.{}.mlp.up", ff_down_proj="model.layers.{}.mlp.down",
                                  final_norm="model.norm")
    points = points_of(names, 2)
    assert [p.name for p in points[:9]] == [
        "embedding", "layers.0.input_norm", "layers.0.attention.q", "layers.0.attention.k", "layers.0.attention.v",
        "layers.0.attention.q_rope", "layers.0.attention.k_rope", "layers.0.attention.output",
        "layers.0.attention.projection"]
    by_name = {p.name: p for p in points}
    assert by_name["layers.1.attention.q_rope"].hf == "model.layers.1.attn"  # the attention module calls RoPE
    assert by_name["layers.1.mlp.up"].reauthored == "transformer_blocks.1.ff.w1"  # no gate: a sequential MLP
    assert by_name["layers.0.attention.k"].take == "k" and by_name["layers.0.attention.k"].hf_take == "output"
    assert [p.name for p in points[-3:]] == ["final_norm", "head", "logits"]  # logits: what the model returns
    assert by_name["layers.1.attention.q_rope"].label == "layer 1 q after RoPE"


@pytest.mark.parametrize("name", ["tiny_llama", "gemma3", "phi3"])  # plain, scaled embedding, fused qkv
def test_clean_pairs_diverge_nowhere(name, pairs, cache, gates):
    divergence = localised(pairs[name], cache, gates)
    assert divergence.first is None, localise.describe(divergence)
    assert len(divergence.errors) >= 26 and all(e.error < divergence.tolerance / 10 for e in divergence.errors)
    assert localise.describe(divergence).startswith("nothing diverges")


PLANTED = [  # pair, the point planted, the first position it shows at
    ("tiny_llama_bad_rope", "layers.0.attention.q_rope", 1),  # position 0 has angle 0: RoPE is the identity there
    ("tiny_llama_swapped_gate_up", "layers.0.mlp.gate", 0),
    ("tiny_llama_norm_eps", "layers.1.post_attention_norm", 0),
    ("tiny_llama_mask_leak", "layers.0.attention.output", 0),
    # Declared with the swapped map: matched through it, gate and up agree one by one; their product does not.
    ("tiny_llama_map_swaps_gate_up", "layers.0.mlp.activation", 0),
]


@pytest.mark.parametrize("name, point, position", PLANTED)
def test_planted_defects_are_found_at_the_planted_point(name, point, position, all_pairs, cache, gates):
    divergence = localised(all_pairs[name], cache, gates)
    first = divergence.first
    assert (first.point.name, first.position) == (point, position), localise.describe(divergence)
    before = divergence.errors[:divergence.errors.index(first)]
    assert before and all(e.error <= divergence.tolerance for e in before)  # every earlier point agrees
    assert first.error > 10 * divergence.tolerance


FAMILY = {  # (pair, defect of tests/variants.FAMILY_DEFECTS): the first point it shows at, and where
    ("gemma2", "no_final_softcap"): ("logits", 0),  # after the head: only what the model returns differs
    ("gemma2", "no_attention_softcap"): ("layers.0.attention.output", 1),
    ("gemma2", "every_layer_global"): ("layers.0.attention.output", 8),  # the first position past the window
    ("gemma3", "window_doubled"): ("layers.0.attention.output", 8),
    # gemma3 declares its QK norms as points (models/_points.py): the norm's module is gone, so it is absent.
    ("gemma3", "no_qk_norm"): ("layers.0.attention.q_norm", 0),
    ("phi2", "full_rotary"): ("layers.0.attention.output", 1),  # partial RoPE outputs differ in shape: not matched
    ("qwen2_5", "no_qkv_bias"): ("layers.0.attention.q", 0),
}


@pytest.mark.parametrize("pair_name, defect", list(FAMILY), ids=[f"{p}-{d}" for p, d in FAMILY])
def test_each_familys_broken_feature_is_found_where_it_acts(pair_name, defect, pairs, cache, gates):
    from tests import variants

    change = next(c for p, d, c, _ in variants.FAMILY_DEFECTS if (p, d) == (pair_name, defect))
    divergence = localised(variants.broken(pairs[pair_name], defect, change), cache, gates)
    first = divergence.first
    assert (first.point.name, first.position) == FAMILY[(pair_name, defect)], localise.describe(divergence)


def test_a_failing_run_carries_one_divergence_record_and_its_summary_line(all_pairs, options):
    pair = all_pairs["tiny_llama_bad_rope"]
    rep = verify_pair(pair, options.derive(stages=(stages.REAUTHORED,)))
    records = [r for r in rep.results if r.check == stages.DIVERGENCE]
    assert len(records) == 1 and records[0].status == INFO and records[0].stage == stages.REAUTHORED
    metrics = records[0].metrics
    assert (metrics["point"], metrics["layer"], metrics["position"]) == ("layers.0.attention.q_rope", 0, 1)
    assert metrics["error"] > metrics["tolerance"] == records[0].threshold["max_error"]
    assert list(metrics["points"])[:6] == ["embedding", "layers.0.input_norm", "layers.0.attention.q",
                                          "layers.0.attention.k", "layers.0.attention.v", "layers.0.attention.q_rope"]
    document = report.parity_document({}, rep.results, {pair.name: {}})
    summary = report.render_summary(document)
    failures = summary.split("## Failures", 1)[1].split("## Pairs", 1)[0]  # the failure list leads the details
    # Under the stage's first failure, and leading the pair's folded table.
    assert "\n  - first divergence: reauthored, layer 0 q after RoPE, position 1 (" in failures
    section = summary.split(f"<details><summary>{pair.name}: FAIL", 1)[1].split("</summary>", 1)[1].lstrip("\n")
    assert section.startswith("first divergence: reauthored, layer 0 q after RoPE, position 1 ("), section[:200]


def test_an_export_only_skew_is_localised_at_exported_and_only_there(options):
    from tests import variants

    rep = verify_pair(variants.variant(variants.skewed_when_exported), options.derive(stages=(stages.EXPORTED,)))
    records = {r.stage: r for r in rep.results if r.check == stages.DIVERGENCE}
    assert set(records) == {stages.EXPORTED}, [(r.stage, r.check, r.status) for r in rep.results]  # reauthored passes
    metrics = records[stages.EXPORTED].metrics
    assert (metrics["point"], metrics["position"]) == ("logits", 0), records[stages.EXPORTED].message
    earlier = [e for name, e in metrics["points"].items() if name != "logits"]
    assert len(earlier) >= 20 and max(earlier) < metrics["tolerance"] < metrics["error"]  # every module agrees
    assert "layers.0.attention.q_rope" not in metrics["points"]  # a traced program calls no RoPE function


def test_a_passing_run_has_no_divergence_record(pairs, options):
    rep = verify_pair(pairs["tiny_llama"], options.derive(stages=(stages.REAUTHORED,)))
    assert {r.status for r in rep.results if r.stage == stages.REAUTHORED} == {"pass"}
    assert not [r for r in rep.results if r.check == stages.DIVERGENCE]
    assert stages.DIVERGENCE not in rep.timings


def test_divergence_line_renders_the_record():
    record = {"model": "m", "stage": "reauthored", "check": "divergence", "status": "info", "threshold": {},
              "message": "", "metrics": {"point": "layers.0.attention.q_rope", "label": "layer 0 q after RoPE",
                                         "layer": 0, "position": 1, "error": 0.83, "tolerance": 2e-4}}
    assert summary.divergence_line(record) == ("first divergence: reauthored, layer 0 q after RoPE, position 1 "
                                              "(0.83, tolerance 0.0002)")
    record["metrics"] = dict(record["metrics"], point=None)
    assert summary.divergence_line(record).startswith("nothing diverges")


def test_a_pairs_declared_points_sit_after_theirs_and_a_wrong_one_is_an_error(pairs, cache):
    from harness.divergence import pair_points
    from harness.errors import HarnessError
    from harness.pairs import DivergencePoint, fingerprint

    pair = pairs["gemma3"]
    model, _ = build_reauthored(pair, reference_checkpoint(pair, cache), pair.export.kv_cache_max)
    names = [p.name for p in pair_points(pair, model)]
    for layer in (0, 1):
        at = names.index(f"layers.{layer}.attention.v")
        assert names[at + 1:at + 4] == [f"layers.{layer}.attention.q_norm", f"layers.{layer}.attention.k_norm",
                                        f"layers.{layer}.attention.q_rope"], names
    # Localisation's points shape no output: the golden's fingerprint of the pair does not move with them.
    assert fingerprint(dataclasses.replace(pair, divergence_points=())) == fingerprint(pair)
    misplaced = dataclasses.replace(pair, divergence_points=(
        DivergencePoint("attention.x", "model.layers.{}.self_attn.q_norm", "transformer_blocks.{}.atten_func.query_norm",
                        after="attention.vv"),))
    with pytest.raises(HarnessError, match="comes after 'attention.vv', which is not one of its points"):
        pair_points(misplaced, model)
    misspelt = dataclasses.replace(pair, divergence_points=(
        DivergencePoint("attention.x", "model.layers.{}.self_attn.qnorm", "transformer_blocks.{}.atten_func.query_norm",
                        after="attention.v"),))
    hf_model = load_hf(pair, reference_checkpoint(pair, cache))
    with pytest.raises(HarnessError, match="the HF model has no module 'model.layers.0.self_attn.qnorm'"):
        localise.localise_reauthored(misspelt, hf_model, model, np.asarray(make_prompts(pair)[0]), 1e-4)


def test_a_pair_without_a_tensor_name_map_is_refused(pairs, cache):
    from harness.divergence import pair_points
    from harness.errors import HarnessError

    pair = dataclasses.replace(pairs["tiny_llama"], reauthored=lambda *a: None)
    with pytest.raises(HarnessError, match="names a tensor-name map"):
        pair_points(pair, object())


def test_a_kv_cache_write_off_by_one_in_decoding_is_found_at_the_first_decoded_position(all_pairs, options):
    """Decode-only: the divergence step prefills the prompt and decodes the rest, as the stage ran it, so the
    first point past tolerance is layer 0's attention output at the prompt's length, every earlier one clean."""
    pair = all_pairs["tiny_llama_kv_write_off_by_one"]
    rep = verify_pair(pair, options.derive(stages=(stages.REAUTHORED,)))
    records = [r for r in rep.results if r.check == stages.DIVERGENCE]
    assert [r.stage for r in records] == [stages.REAUTHORED], [(r.stage, r.check, r.status) for r in rep.results]
    metrics, prompt = records[0].metrics, records[0].metrics["prompt"]
    prompt_len = len(make_prompts(pair)[prompt])
    assert (metrics["point"], metrics["position"]) == ("layers.0.attention.output", prompt_len), records[0].message
    points = list(metrics["points"])
    before = [metrics["points"][p] for p in points[:points.index("layers.0.attention.output")]]
    assert len(before) == 7 and max(before) < metrics["tolerance"]  # q/k/v, even after RoPE, are right
    # One prefill of the same tokens writes every slot where it should: nothing diverges that way.
    prefilled = localised(pair, options.cache, options.gates, prompt)
    assert prefilled.first is None, localise.describe(prefilled)
