"""The litertlm stages: tiny_llama's float and dynamic_int8 flatbuffers bundled with its tokenizer and run by the
real LiteRT-LM engine (litert-lm-api), clean and with one planted bundle defect of each kind."""

from __future__ import annotations

import dataclasses

import pytest

from harness import bundle, stages
from harness.pipeline import verify_pair
from harness.records import ERROR, FAIL, PASS, SKIP, XFAIL

INT8_BUNDLE = stages.litertlm_stage("dynamic_int8")


def _bundle_results(pair, options, stage: str = stages.LITERTLM) -> dict:
    report = verify_pair(pair, options.derive(stages=(stage,)))
    return {r.check: r for r in report.results if r.stage == stage}


@pytest.fixture(scope="module")
def clean(tiny_llama, options):
    return _bundle_results(tiny_llama, options)


def test_clean_bundle_matches_hf_in_the_engine(clean, tiny_llama):
    assert {c: r.status for c, r in clean.items()} == {
        stages.TOKENIZER: PASS, stages.METADATA: PASS, stages.PROMPT_TEMPLATE: SKIP, stages.GREEDY_TEXT: PASS,
        stages.SCORE: XFAIL}
    texts = clean[stages.GREEDY_TEXT].metrics["texts"]
    assert len(texts) == len(tiny_llama.workload.prompt_lens)
    # Each is the full new_tokens (no early stop), so the comparison covers every generated token.
    assert all(len(t["reference"].split()) == tiny_llama.workload.new_tokens for t in texts)
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


def test_the_engines_scores_are_the_declared_defect_and_only_it(clean):
    score = clean[stages.SCORE]
    assert score.defect == "ENGINE_SCORES_WITHOUT_SECOND_TO_LAST_TOKEN"
    assert score.metrics["score_err"] > 1.0  # nats: against the context it was given, the engine is far off
    assert score.metrics["dropped_token_context_err"] < 1e-3  # and matches HF without the second-to-last token
    assert score.metrics["token_count_mismatches"] == 0 and score.metrics["targets"] == 3


def test_a_score_error_the_defect_does_not_explain_fails(tiny_llama, options, monkeypatch):
    right = bundle.run_engine

    def off(job):  # every target token scored 0.5 nats too high: neither context explains it
        result = right(job)
        return {**result, "token_scores": [[s + 0.5 for s in t] for t in result["token_scores"]]}

    monkeypatch.setattr(bundle, "run_engine", off)
    score = _bundle_results(tiny_llama, options)[stages.SCORE]
    assert score.status == FAIL
    assert "outside the band of declared defect ENGINE_SCORES_WITHOUT_SECOND_TO_LAST_TOKEN" in score.message


def test_a_fixed_engine_fails_the_declaration(tiny_llama, options, monkeypatch):
    right = bundle.reference_scores

    def fixed(reference, tokenizer, start, context, target):  # as if the engine scored the context it was given
        scores = right(reference, tokenizer, start, context, target)
        return {**scores, "context": scores["dropped_token_context"]}

    monkeypatch.setattr(bundle, "reference_scores", fixed)
    score = _bundle_results(tiny_llama, options)[stages.SCORE]
    assert score.status == FAIL
    assert "did not show" in score.message and "remove its declaration" in score.message


def test_the_quantized_bundle_matches_the_interpreter_on_its_flatbuffer(tiny_llama, options):
    results = _bundle_results(tiny_llama, options, INT8_BUNDLE)
    assert {c: r.status for c, r in results.items()} == {
        stages.TOKENIZER: PASS, stages.METADATA: PASS, stages.PROMPT_TEMPLATE: SKIP, stages.GREEDY_TEXT: PASS,
        stages.SCORE: XFAIL}
    assert results[stages.GREEDY_TEXT].metrics["against"] == "the interpreter"
    assert results[stages.SCORE].metrics["dropped_token_context_err"] < 1e-3


def test_a_quantized_bundle_brings_its_recipe_stage(tiny_llama, options):
    from harness.pipeline import planned_stages

    names = [s.name for s in planned_stages(tiny_llama, options.derive(stages=(INT8_BUNDLE,)))]
    assert names.index(stages.tflite_stage("dynamic_int8")) < names.index(INT8_BUNDLE)
    assert stages.LITERTLM not in names


def test_a_band_metric_outside_its_band_fails_even_when_its_gate_holds():
    from harness.gates import Gate
    from harness.pairs import ExpectedFailure

    defect = ExpectedFailure("D", "planted", stages.LITERTLM, stages.SCORE,
                             {"score_err": (1.0, 10.0), "dropped_token_context_err": (0.0, 1e-3)})
    gate = Gate({"max_score_err": 1e-3}, defect)
    assert gate.judge({"score_err": 3.0, "dropped_token_context_err": 1e-5})[0] == XFAIL
    status, reasons = gate.judge({"score_err": 3.0, "dropped_token_context_err": 0.2})
    assert status == FAIL and "dropped_token_context_err=0.2" in reasons[-1]
    assert gate.judge({"score_err": 3.0})[0] == FAIL  # a band metric not measured cannot excuse


def test_a_template_the_engine_renders_otherwise_fails_prompt_template(gates, tiny_llama):
    from harness import checks
    from harness.gates import gate_for

    gate = gate_for(gates, tiny_llama, stages.LITERTLM, stages.PROMPT_TEMPLATE)
    assert checks.prompt_template("m", stages.LITERTLM, [2, 5, 6, 7], [2, 5, 6, 7], "", gate).status == PASS
    # The engine hands a template each message's content as a list of parts; a template written for strings
    # renders that list (seen with a naive "{{ message['content'] }}" template in litert-lm-api 0.18.1).
    wrong = checks.prompt_template("m", stages.LITERTLM, [2, 5, 6, 7], [2, 5, 9, 9, 7], '[{"type": "text"...', gate)
    assert wrong.status == FAIL and "the ids differ from position 2 of 4" in wrong.message
    assert checks.prompt_template("m", stages.LITERTLM, [2, 5, 6], [2, 5, 6, 7], "", gate).status == FAIL


def test_the_engines_reason_is_its_exception_not_its_shutdown_lines(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text("I0000 loading\nTraceback (most recent call last):\n  File \"w.py\", line 3, in main\n"
                   "    job['conversation']\nKeyError: 'conversation'\nDestroyAccelerator: ptr=0x5, name=GPU WebGPU\n")
    assert bundle.engine_reason(log) == ": KeyError: 'conversation'"
    log.write_text("I0000 loading\nE0000 00:00:1.0 1 engine.cc:9] NOT_FOUND: no prefill signature\nbye\n")
    assert bundle.engine_reason(log) == ": NOT_FOUND: no prefill signature"
