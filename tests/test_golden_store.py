"""Golden files: a broken, foreign or missing golden is caught and named with its fix; none is stale."""

import dataclasses

import pytest

from harness import golden, stages
from harness.config import RunConfig
from harness.errors import GoldenError
from harness.pairs import discover
from harness.paths import display_path
from harness.pipeline import RunOptions, verify_pair
from harness.records import ERROR, PASS, SKIP


def _broken(directory, text):
    directory.mkdir(exist_ok=True)
    golden.golden_path(directory, "tiny_llama").write_text(text)
    return directory


def _good_text(recorded):
    return golden.golden_path(recorded, "tiny_llama").read_text()


@pytest.mark.parametrize("breakage, expected", [
    (lambda t: t[: len(t) // 2], "is corrupt (not valid JSON"),
    (lambda t: t.replace('"schema_version": 1', '"schema_version": 99'), "has schema version 99, but this harness "
                                                                          "reads version 1"),
    (lambda t: t.replace('"logits": [', '"logit": [', 1), "is corrupt (stages.hf.top_k[0][0] is not ids and logits"),
    (lambda t: t.replace('"model": "tiny_llama"', '"model": "tiny_gemma"'), "is for model 'tiny_gemma'"),
    (lambda t: "[]", "is corrupt (no schema_version)"),
])
def test_a_broken_golden_is_an_error_naming_the_file_and_the_fix(breakage, expected, tiny_llama, tiny_llama_report,
                                                                 options, recorded, tmp_path):
    directory = _broken(tmp_path / "g", breakage(_good_text(recorded)))
    [r] = golden.GoldenCheck(directory).check(tiny_llama, tiny_llama_report.state.logits, tiny_llama_report.state.trajectories, options.gates)
    assert (r.stage, r.check, r.status) == (golden.GOLDEN, golden.GOLDEN, ERROR)
    assert expected in r.message, r.message
    assert display_path(golden.golden_path(directory, "tiny_llama")) in r.message
    assert "harness golden update --models tiny_llama" in r.message
    with pytest.raises(GoldenError):
        golden.load(directory, tiny_llama)


def test_a_golden_of_another_pair_definition_is_an_error(tiny_llama, tiny_llama_report, options, recorded):
    other = dataclasses.replace(tiny_llama, hf_config={**tiny_llama.hf_config, "rope_theta": 5000.0})
    [r] = golden.GoldenCheck(recorded).check(other, tiny_llama_report.state.logits, tiny_llama_report.state.trajectories, options.gates)
    assert r.status == ERROR and "was recorded for another definition of tiny_llama" in r.message
    assert "harness golden update --models tiny_llama" in r.message


def test_a_missing_golden_is_a_skip_normally_and_an_error_in_release_mode(tiny_llama, tiny_llama_report, options,
                                                                         tmp_path):
    [normal] = golden.GoldenCheck(tmp_path).check(tiny_llama, tiny_llama_report.state.logits, tiny_llama_report.state.trajectories, options.gates)
    [strict] = golden.GoldenCheck(tmp_path, strict=True).check(tiny_llama, tiny_llama_report.state.logits, tiny_llama_report.state.trajectories, options.gates)
    assert normal.status == SKIP and strict.status == ERROR
    assert "no golden for tiny_llama" in normal.message
    assert "harness golden update --models tiny_llama" in normal.message


def test_a_corrupt_golden_does_not_stop_the_other_checks(tiny_llama, gates, cache, recorded, tmp_path):
    directory = _broken(tmp_path / "g", "{not json")
    rep = verify_pair(tiny_llama, RunOptions(RunConfig(stages=(stages.REAUTHORED,)), gates, cache,
                                             (golden.GoldenCheck(directory),)))
    statuses = {(r.stage, r.check): r.status for r in rep.results}
    assert statuses[(golden.GOLDEN, golden.GOLDEN)] == ERROR
    assert statuses[("reauthored", "logits")] == PASS and statuses[("hf", "sensitivity")] == PASS


def test_committed_goldens_cover_the_default_suite_and_nothing_else():
    pairs = discover()
    files = {p.stem for p in golden.DEFAULT_GOLDEN_DIR.glob("*.json")}
    assert not golden.stale_files(golden.DEFAULT_GOLDEN_DIR, set(pairs))
    missing = [p.name for p in pairs.values() if "default" in p.suites and p.name not in files]
    assert not missing, f"no golden for {missing}: run `harness golden update --models {','.join(missing)}`"
    assert sum(p.stat().st_size for p in golden.DEFAULT_GOLDEN_DIR.glob("*.json")) < 5_000_000
