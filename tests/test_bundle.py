"""The litertlm stage: tiny_llama's float flatbuffer bundled with its tokenizer and run by the real LiteRT-LM
engine (litert-lm-api), clean and with one planted bundle defect of each kind."""

from __future__ import annotations

import dataclasses

import pytest

from harness import bundle, stages
from harness.pipeline import verify_pair
from harness.records import ERROR, FAIL, PASS


def _bundle_results(pair, options) -> dict:
    report = verify_pair(pair, options.derive(stages=(stages.LITERTLM,)))
    return {r.check: r for r in report.results if r.stage == stages.LITERTLM}


@pytest.fixture(scope="module")
def clean(tiny_llama, options):
    return _bundle_results(tiny_llama, options)


def test_the_bundle_stage_runs_only_when_named(tiny_llama, options):
    from harness.pipeline import planned_stages

    assert stages.LITERTLM not in [s.name for s in planned_stages(tiny_llama, options)]
    assert stages.LITERTLM in [s.name for s in planned_stages(tiny_llama, options.derive(stages=(stages.LITERTLM,)))]


def test_clean_bundle_matches_hf_in_the_engine(clean, tiny_llama):
    assert {c: r.status for c, r in clean.items()} == {
        stages.TOKENIZER: PASS, stages.METADATA: PASS, stages.GREEDY_TEXT: PASS}
    texts = clean[stages.GREEDY_TEXT].metrics["texts"]
    assert len(texts) == len(tiny_llama.workload.prompt_lens)
    # Each is the full new_tokens (no early stop), so the comparison covers every generated token.
    assert all(len(t["hf"].split()) == tiny_llama.workload.new_tokens for t in texts)
    assert clean[stages.TOKENIZER].metrics["texts"] == len(bundle.TOKENIZER_TEXTS)


def test_a_wrong_stop_id_fails_metadata(tiny_llama, options, monkeypatch):
    right = bundle.hf_settings
    monkeypatch.setattr(bundle, "hf_settings",
                        lambda pair, ck: dataclasses.replace(right(pair, ck), stop_token_ids=(7,)))
    results = _bundle_results(tiny_llama, options)
    assert results[stages.METADATA].status == FAIL
    assert "stop_token_ids: the engine reads [[7]], HF has [[2]]" in results[stages.METADATA].message
    assert results[stages.TOKENIZER].status == PASS


def test_a_tokenizer_that_differs_from_hf_fails_tokenizer(tiny_llama, options, monkeypatch):
    def swapped(pair, checkpoint, out):  # two words trade ids: the bundle's tokenizer is not HF's
        vocab = bundle.word_vocab(int(pair.hf_config["vocab_size"]))
        vocab["w5"], vocab["w17"] = vocab["w17"], vocab["w5"]
        bundle.word_tokenizer(vocab).save(str(out / bundle.TOKENIZER_FILE))
        return out / bundle.TOKENIZER_FILE

    monkeypatch.setattr(bundle, "tokenizer_file", swapped)
    results = _bundle_results(tiny_llama, options)
    assert results[stages.TOKENIZER].status == FAIL
    assert "text 0 'w5 w17 w200 w33': the engine gives ids [17, 5, 200, 33]" in results[stages.TOKENIZER].message
    assert results[stages.METADATA].status == PASS


def test_a_bundle_of_the_wrong_flatbuffer_fails_greedy_text(tiny_llama, options, monkeypatch):
    from harness import convert

    right = convert.convert

    def coarse(pair, model, checkpoint, recipe, cache, quiet=True, kv_layout="default"):
        # The bundle is made of the int4 flatbuffer instead of the float one.
        wrong = "dynamic_int4_block32" if kv_layout == "transposed" else recipe
        return right(pair, model, checkpoint, wrong, cache, quiet, kv_layout)

    monkeypatch.setattr(convert, "convert", coarse)
    results = _bundle_results(tiny_llama, options)
    assert results[stages.GREEDY_TEXT].status == FAIL
    assert results[stages.GREEDY_TEXT].metrics["identical"] < 1.0
    assert "the engine wrote" in results[stages.GREEDY_TEXT].message
    assert results[stages.TOKENIZER].status == results[stages.METADATA].status == PASS


def test_an_engine_failure_carries_the_engines_reason(tmp_path):
    broken = tmp_path / "model.litertlm"
    broken.write_bytes(b"not a bundle")
    with pytest.raises(Exception) as caught:
        bundle.run_engine(bundle.EngineJob(str(broken)))
    message = str(caught.value)
    assert "the LiteRT-LM engine failed (exit code 1)" in message
    assert str(tmp_path) not in message  # scrubbed, no absolute paths
    assert ":" in message.split("failed (exit code 1)", 1)[1]  # the engine's own reason follows


def test_bundle_keys_follow_the_flatbuffer_the_tokenizer_and_the_settings(tmp_path):
    a, b, tok = tmp_path / "a.tflite", tmp_path / "b.tflite", tmp_path / "tokenizer.json"
    a.write_bytes(b"a"), b.write_bytes(b"b"), tok.write_text("{}")
    settings = bundle.BundleSettings(1, (2,), 64)
    key = bundle.bundle_key(a, tok, settings)
    assert key == bundle.bundle_key(a, tok, settings)
    assert key != bundle.bundle_key(b, tok, settings)
    assert key != bundle.bundle_key(a, tok, dataclasses.replace(settings, stop_token_ids=(3,)))
    tok.write_text('{"x": 1}')
    assert key != bundle.bundle_key(a, tok, settings)


def test_a_stage_error_is_an_error_record_not_a_pass(tiny_llama, options, monkeypatch):
    def crash(job):
        raise bundle.HarnessError("the LiteRT-LM engine failed (signal 11): planted")

    monkeypatch.setattr(bundle, "run_engine", crash)
    report = verify_pair(tiny_llama, options.derive(stages=(stages.LITERTLM,)))
    records = [r for r in report.results if r.stage == stages.LITERTLM]
    assert [(r.check, r.status) for r in records] == [(stages.STAGE_RUN, ERROR)]
    assert "signal 11" in records[0].message
