"""Every model pair of the default suite through every stage, and the errors a broken pair gives."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import cli, stages
from harness.checkpoint import build_reauthored, reference_checkpoint
from harness.errors import CheckpointError
from harness.pairs import discover
from harness.records import ERROR, FAIL, PASS, SKIP, XFAIL
from harness.suite import run_suite

QUICK_STAGES = (stages.HF, stages.REAUTHORED)


def pytest_generate_tests(metafunc):
    """One test per pair of the default suite; pairs with a real checkpoint are slow."""
    if "pair_name" in metafunc.fixturenames:
        params = [pytest.param(name, marks=[pytest.mark.slow] if pair.checkpoint_builder else [])
                  for name, pair in sorted(discover().items()) if "default" in pair.suites]
        metafunc.parametrize("pair_name", params)


def _expected_stages(pair) -> set[str]:
    return set(stages.FLOAT_STAGES) | {stages.tflite_stage(r) for r in pair.default_quant} | {
        stages.litertlm_stage(r) for r in (None, *pair.default_quant)}


def _allowed(record, declared, opted_out) -> bool:
    """Pass; a declared defect's xfail; an opted-out stage's one skip, with its reason; or the prompt template
    skipped for a tokenizer with no chat template (the tiny pairs' word tokenizer)."""
    if record.stage in opted_out:
        return record.status == SKIP and record.check == stages.STAGE_RUN and opted_out[record.stage] in record.message
    return record.status == PASS or (record.status == XFAIL and (record.stage, record.check) in declared) or (
        record.status == SKIP and record.check == stages.PROMPT_TEMPLATE and "no chat template" in record.message)


def test_pair_passes_every_stage(pair_name, pairs, pair_report):
    """Every pipeline stage, the bundle stages included, and its property checks pass at full tolerance; the
    only xfail allowed is a declared upstream defect's own record (the pair's or the engine's), inside its
    declared band; a stage the pair opts out of is one skip with its reason. Goldens have their own tests."""
    from harness.pairs import declared_defects

    pair = pairs[pair_name]
    report = pair_report(pair_name)  # shared with the property tests: one verify per pair per session
    results = [r for r in report.results if r.stage in _expected_stages(pair)]
    ran = {r.stage for r in results}
    assert ran == _expected_stages(pair), f"{pair_name}: stages that never reported: {_expected_stages(pair) - ran}"
    declared = {(d.stage, d.check): d for d in declared_defects(pair)}
    opted_out = dict(pair.opt_in_stages)
    bad = [f"{r.stage}/{r.check} {r.status}: {r.message}" for r in results if not _allowed(r, declared, opted_out)]
    assert not bad, f"{pair_name}:\n" + "\n".join(bad)
    for (stage, check), defect in declared.items():
        if stage not in ran or stage in opted_out:
            continue
        (record,) = [r for r in results if (r.stage, r.check) == (stage, check)]
        assert record.status == XFAIL and record.defect == defect.name
        assert all(defect.excuses(m, record.metrics[m]) for m in defect.band), (record.metrics, defect.band)


def test_hfs_greedy_tokens_are_the_argmax_of_its_own_logits(pair_name, pair_report):
    """HF generates from the head's logits at the last position only (workload.greedy_trajectory); each token
    it chose must be the argmax of the logits of its one forward over the whole trajectory, which every stage's
    greedy check is held to."""
    from harness.workload import greedy_of

    state = pair_report(pair_name).state
    for logits, trajectory in zip(state.logits[stages.HF], state.trajectories, strict=True):
        assert np.array_equal(greedy_of(logits, trajectory), trajectory.greedy), pair_name


def test_unrelated_or_shuffled_logits_fail_every_quantized_gate(pair_name, pairs, pair_report, gates):
    """Every recipe's budget, applied to logits that have nothing to do with the float flatbuffer's (its own
    logits at shuffled positions, or with the vocabulary permuted), fails: no budget is so loose it passes noise."""
    from harness import checks
    from harness.gates import Gate

    report = pair_report(pair_name)
    reference = report.state.logits[stages.TFLITE_FLOAT]
    rng = np.random.default_rng(0)
    flat = np.concatenate(reference)
    shuffled_rows = flat[rng.permutation(len(flat))]
    fakes = {"shuffled positions": np.split(shuffled_rows, np.cumsum([len(r) for r in reference])[:-1]),
             "permuted vocabulary": [r[:, rng.permutation(r.shape[1])] for r in reference]}
    for recipe in stages.QUANT_RECIPES:
        stage = stages.tflite_stage(recipe)
        gate = Gate(gates.thresholds(pair_name, stage, stages.QUANT_ACCURACY))
        for label, fake in fakes.items():
            result = checks.quant_accuracy(pair_name, stage, fake, reference, gate)
            assert result.status == FAIL, (recipe, label, result.metrics)


# Error paths, on tiny_llama's checkpoint (untied head, so litert-torch loads it strictly).

@pytest.fixture
def checkpoint_copy(tiny_llama, cache, tmp_path):
    """A writable copy of tiny_llama's checkpoint and its tensors."""
    source = reference_checkpoint(tiny_llama, cache)
    copy = tmp_path / "checkpoint"
    shutil.copytree(source, copy)
    (weights,) = copy.glob("*.safetensors")
    return weights, load_file(weights)


def test_building_a_checkpoint_leaves_the_pair_as_declared(pairs, tmp_path):
    import copy

    from harness.cache import ArtifactCache
    from harness.golden import reference_key

    pair = pairs["phi3"]  # longrope: transformers adds keys to a rope_parameters dict it is handed
    declared, key = copy.deepcopy(pair.hf_config), reference_key(pair)
    reference_checkpoint(pair, ArtifactCache(tmp_path / "cold"))
    assert pair.hf_config == declared and reference_key(pair) == key


def test_weights_no_checkpoint_tensor_fills_are_listed_as_unloaded(tiny_llama, cache):
    """The builder adds weights after litert-torch's loader ran: a Linear (torch.nn.init's draws, which the two
    builds fill with different constants) and a parameter drawn by a tensor's own normal_ (seeded differently);
    the weights the checkpoint fills are the same in both builds and not listed."""
    def builder(checkpoint_path, custom_loader=None, mask_cache_size=0):
        model = tiny_llama.reauthored(checkpoint_path, custom_loader, mask_cache_size)
        model.unmapped = torch.nn.Linear(4, 4)
        model.drawn = torch.nn.Parameter(torch.empty(3).normal_())
        return model

    pair = dataclasses.replace(tiny_llama, reauthored=builder)
    _, coverage = build_reauthored(pair, reference_checkpoint(pair, cache), pair.export.kv_cache_max)
    assert coverage["unloaded_params"] == ["drawn", "unmapped.bias", "unmapped.weight"]
    assert not coverage["unused"] and not coverage["consumed_twice"] and not coverage["dropped"]


def test_checkpoint_missing_tensor_is_named(tiny_llama, checkpoint_copy):
    weights, tensors = checkpoint_copy
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks model\.layers\.1\.mlp\.up_proj\.weight"):
        build_reauthored(tiny_llama, weights.parent, tiny_llama.export.kv_cache_max)


def test_checkpoint_extra_tensor_is_named(tiny_llama, checkpoint_copy):
    weights, tensors = checkpoint_copy
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra_proj\.weight"):
        build_reauthored(tiny_llama, weights.parent, tiny_llama.export.kv_cache_max)


def test_cli_unknown_model_exits_2_and_runs_the_others(tmp_path, capsys):
    out = tmp_path / "report"
    code = cli.main(["verify", "--models", "tiny_llama,nope", "--stages", "hf,reauthored", "--in-process",
                     "--out", str(out)])
    assert code == cli.EXIT_USAGE
    assert "unknown model pair 'nope'" in capsys.readouterr().err
    results = json.loads((out / "parity.json").read_text())["results"]
    assert {r["status"] for r in results if r["model"] == "tiny_llama"} == {PASS}
    (nope,) = [r for r in results if r["model"] == "nope"]
    assert nope["status"] == ERROR and "known: " in nope["message"]


@pytest.mark.parametrize("change, message", [
    ({"hf_class": "NoSuchModelForCausalLM"}, "transformers has no class 'NoSuchModelForCausalLM'"),
    ({"hf_config_update": {"hidden_size": 130}}, "hf_config does not fit LlamaConfig"),
], ids=["unknown_hf_class", "config_does_not_fit"])
def test_unsupported_architecture_is_an_error_record_and_others_run(change, message, tiny_llama, options, tmp_path):
    fields = {k: v for k, v in change.items() if k != "hf_config_update"}
    config = {**tiny_llama.hf_config, **change.get("hf_config_update", {})}
    broken = dataclasses.replace(tiny_llama, name="broken", hf_config=config, **fields)
    quick = options.derive(stages=QUICK_STAGES, models=("broken", "tiny_llama"), isolate=False, out=str(tmp_path))
    document = run_suite(quick.config, lambda line: None, quick, extra_pairs={"broken": broken})
    by_model = {}
    for r in document["results"]:
        by_model.setdefault(r["model"], []).append(r)
    errors = [r for r in by_model["broken"] if r["status"] == ERROR]
    assert len(errors) == 1 and errors[0]["stage"] == stages.HF and message in errors[0]["message"]
    assert {r["status"] for r in by_model["tiny_llama"]} == {PASS}
