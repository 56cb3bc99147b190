"""The real Gemma 3 270M through every stage and on real text, and the real-text check itself.

The real-model tests take minutes and GiBs: they run only with --run-slow. The others hold
harness/realtext.py to a tiny random Llama and a byte tokenizer, so they run everywhere.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from harness import realtext, stages
from harness.checkpoint import load_hf
from harness.gates import Gates
from harness.pipeline import verify_pair
from harness.records import ERROR, FAIL, INFO, PASS, SKIP, XFAIL
from harness.runners import Runner

REAL = "gemma3_270m_real"
INT8 = stages.tflite_stage("dynamic_int8")


# ---------------------------------------------------------------- the real model (slow)

@pytest.mark.slow
def test_explain_localises_the_real_models_reauthored_stage(pairs, cache, gates):
    """`harness explain` on the real model: nothing diverges at its 310 points (18 layers), and one layer's
    norm epsilon set wrong is found at that layer's norm, every earlier point clean."""
    from harness import explain
    from tests import variants

    pair = pairs[REAL]
    clean = explain.explain(pair, (), stages.REAUTHORED, 0, gates, cache).divergence
    assert clean.first is None and len(clean.errors) == 310, explain.table(clean)
    assert max(e.error for e in clean.errors) < clean.tolerance / 10
    planted = variants.broken(pair, "layer_5_norm_eps", lambda c: variants.set_norm_eps(c, 5, 10.0))
    divergence = explain.explain(planted, (), stages.REAUTHORED, 0, gates, cache).divergence
    first = divergence.first
    assert (first.point.name, first.position) == ("layers.5.post_attention_norm", 0), explain.table(divergence)
    assert all(e.error <= divergence.tolerance for e in divergence.errors[:divergence.errors.index(first)])


@pytest.fixture(scope="module")
def real_report(pairs, options):
    """gemma3_270m_real with its default recipe (dynamic_int8), once per module."""
    return verify_pair(pairs[REAL], options)


def _result(report, stage: str, check: str):
    found = [r for r in report.results if r.stage == stage and r.check == check]
    assert len(found) == 1, f"expected one {stage}/{check} record, got {len(found)}"
    return found[0]


@pytest.mark.slow
def test_real_model_passes_every_gate(real_report, pairs):
    """Every stage runs (StableHLO too, its weights fed as arguments) and passes, but for its declared
    upstream defect; only opted-out checks skip, and the stages it runs only when named (its bundles)."""
    pair = pairs[REAL]
    opted_out = {"golden"} | {name for name, _ in pair.skipped_checks} | {name for name, _ in pair.opt_in_stages}
    excused = {(d.stage, d.check) for d in pair.expected_failures}
    informational = {(s, realtext.GREEDY_TEXT) for s in (INT8,)}  # a quantized model's own text: reported
    bad = [f"{r.stage}/{r.check}: {r.status} {r.message}" for r in real_report.results
           if not (r.status == PASS or (r.status == SKIP and r.stage in opted_out)
                   or (r.status == XFAIL and (r.stage, r.check) in excused)
                   or (r.status == INFO and (r.stage, r.check) in informational))]
    assert not bad, "\n".join(bad)
    ran = {r.stage for r in real_report.results if r.status in (PASS, XFAIL)}
    assert set(stages.FLOAT_STAGES) | {INT8} <= ran
    assert "function arguments" in real_report.notes["stablehlo_weights"]


@pytest.mark.slow
def test_real_model_accuracy_table(real_report, gates):
    hf = _result(real_report, stages.HF, realtext.PERPLEXITY).metrics
    flt = _result(real_report, stages.TFLITE_FLOAT, realtext.PERPLEXITY).metrics
    int8 = _result(real_report, INT8, realtext.PERPLEXITY).metrics
    assert hf["tokens"] == flt["tokens"] == int8["tokens"] > 4000
    # Float: the same model, so the same perplexity and the same distribution at every position.
    assert abs(flt["ppl_ratio_vs_hf"] - 1) < 1e-3 and flt["kl_vs"] == stages.HF and flt["top1"] > 0.99
    # dynamic_int8 costs a little, within its gates, and is measured against the float flatbuffer.
    limits = gates.thresholds(REAL, INT8, realtext.PERPLEXITY)
    assert int8["kl_vs"] == stages.TFLITE_FLOAT
    assert 1 < int8["ppl_ratio_vs_hf"] <= limits["max_ppl_ratio_vs_hf"]
    assert 0 < int8["mean_kl"] <= limits["max_mean_kl"] and int8["p99_kl"] <= limits["max_p99_kl"]
    assert limits["min_top1"] <= int8["top1"] < 1
    # Code is far more predictable than prose, for every stage.
    for metrics in (hf, flt, int8):
        by_doc = metrics["ppl_by_document"]
        assert by_doc["code_python.txt"] < by_doc["prose_original.txt"]
    text = _result(real_report, stages.TFLITE_FLOAT, realtext.GREEDY_TEXT).metrics
    assert text["identical"] == 1.0 and all(t["hf"].strip() for t in text["texts"])


@pytest.mark.slow
def test_shipped_prompts_match_the_gguf_tokenizer(real_report):
    tokenizer = realtext.load_tokenizer(real_report.state.checkpoint)
    shipped = realtext.load_prompts(realtext.DATA_DIR / "gemma3_270m_prompts.json")
    fresh = [r["ids"] for r in realtext.prompt_records(tokenizer, len(shipped[0]))]
    assert shipped == fresh, ("harness/data/gemma3_270m_prompts.json is stale: regenerate it with "
                              "realtext.write_prompts(tokenizer, 200, path)")


# ---------------------------------------------------------------- the check itself (fast)

class ByteTokenizer:
    """Text as bytes + 2, BOS 1: enough of a tokenizer for a 256-token vocabulary."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(b + 2, 255) for b in text.encode()]}

    def decode(self, ids):
        return bytes(int(i) - 2 for i in ids if int(i) > 1).decode(errors="replace")


class HFRunner(Runner):
    """A stand-in for a flatbuffer, where a test needs what a real one cannot give: noise of a chosen size, and a
    count of how many are open at once. The HF model itself behind the runner interface (padded prefill at any
    offset, decode). The real flatbuffers of tiny_llama run the same check in test_real_text_on_real_flatbuffers."""

    def __init__(self, model, prefill_lens, kv_cache_max, noise: float = 0.0, peers: list | None = None):
        super().__init__(prefill_lens, kv_cache_max)
        self.model = model
        self.rng = np.random.default_rng(0)
        self.noise = noise
        self.is_open, self.most_open = False, 0  # a flatbuffer's interpreter: opened by a call, freed by release
        self.calls = 0
        self.peers = peers if peers is not None else []
        self.peers.append(self)

    def release(self):
        self.is_open = False

    def empty_kv(self):
        return np.zeros(0, np.int64)  # the "cache" is the tokens seen so far

    def call(self, name, tokens, positions, kv):
        self.is_open = True
        self.calls += 1
        self.most_open = max(self.most_open, sum(p.is_open for p in self.peers))
        seen = np.concatenate([kv[: int(positions[0])], tokens[0]])
        with torch.no_grad():
            logits = self.model(torch.as_tensor(seen)[None]).logits[0, int(positions[0]):].numpy()
        return logits + self.noise * self.rng.standard_normal(logits.shape).astype(np.float32), seen


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama, cache):
    from harness.checkpoint import reference_checkpoint

    return load_hf(tiny_llama, reference_checkpoint(tiny_llama, cache))


# A short extract of the corpus: ~10 windows of the tiny pair's 64-token KV cache.
DOCUMENTS = {name: text[:300] for name, text in realtext.corpus().items()}


def _text_gates(stage_limits):
    stage_limits = {stages.HF: {"max_ppl": 1e6}, **stage_limits}  # the random reference: any finite ppl
    return Gates.from_dict({"models": {"tiny_llama": {stage: {realtext.PERPLEXITY: limits}
                                                      for stage, limits in stage_limits.items()}}})


def test_windows_restart_at_bos_and_drop_short_tails():
    ids = [1] + list(range(2, 2 + 3 * 39 + 32))
    cut = realtext.windows(ids, 40)
    assert [len(w) for w in cut] == [40, 40, 40, 33] and all(w[0] == 1 for w in cut)
    assert np.array_equal(np.concatenate([w[1:] for w in cut]), ids[1:])
    assert [len(w) for w in realtext.windows(ids[:40 + 30], 40)] == [40]  # a 31-token tail is no window


def test_nll_is_cross_entropy():
    logits = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32) * 4
    targets = np.array([0, 3, 6, 2, 2])
    expected = torch.nn.functional.cross_entropy(torch.as_tensor(logits, dtype=torch.float64),
                                                 torch.as_tensor(targets), reduction="none").numpy()
    assert np.allclose(realtext.nll(logits, targets), expected)


def test_perplexity_of_a_faithful_stage_matches_hf(tiny_llama, tiny_hf):
    runners = {stages.TFLITE_FLOAT: HFRunner(tiny_hf, (8, 16), 64)}
    gates = _text_gates({stages.TFLITE_FLOAT: {"max_ppl_ratio_vs_hf": 1.0001, "max_mean_kl": 1e-6, "min_top1": 1.0}})
    results = realtext.perplexity(tiny_llama, tiny_hf, runners, ByteTokenizer(), gates, DOCUMENTS)
    assert [(r.stage, r.status) for r in results] == [(stages.HF, PASS), (stages.TFLITE_FLOAT, PASS)]
    hf, flt = (r.metrics for r in results)
    assert hf["tokens"] == flt["tokens"] > 800 and set(hf["ppl_by_document"]) == set(realtext.CORPUS)


def test_perplexity_fails_a_noisy_stage(tiny_llama, tiny_hf):
    runners = {stages.TFLITE_FLOAT: HFRunner(tiny_hf, (8, 16), 64),
               INT8: HFRunner(tiny_hf, (8, 16), 64, noise=10.0)}
    gates = _text_gates({INT8: {"max_ppl_ratio_vs_hf": 1.05, "max_mean_kl": 0.05, "min_top1": 0.85}})
    results = realtext.perplexity(tiny_llama, tiny_hf, runners, ByteTokenizer(), gates, DOCUMENTS)
    noisy = results[-1]
    assert noisy.stage == INT8 and noisy.status == FAIL and noisy.metrics["kl_vs"] == stages.TFLITE_FLOAT
    assert "mean_kl" in noisy.message and "top1" in noisy.message


def test_each_recipe_reads_the_corpus_alone_against_float_as_the_first_pass_kept_it(tiny_llama, tiny_hf, tmp_path,
                                                                                      monkeypatch):
    recipes = [stages.tflite_stage(r) for r in ("dynamic_int8", "fp16", "weight_only_int8")]
    opened: list = []  # every flatbuffer stand-in: how many are open at once
    runners = {stages.TFLITE_FLOAT: HFRunner(tiny_hf, (8, 16), 64, peers=opened),
               **{name: HFRunner(tiny_hf, (8, 16), 64, noise=1.0 + i, peers=opened) for i, name in enumerate(recipes)}}
    assert realtext.reading_passes([stages.HF, *runners]) == [
        [stages.HF, stages.TFLITE_FLOAT], [recipes[0]], [recipes[1]], [recipes[2]]]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where float's logits are kept between passes
    together = {r.stage: r.metrics for r in realtext.perplexity(tiny_llama, tiny_hf, runners, ByteTokenizer(),
                                                                _text_gates({}), DOCUMENTS)}
    assert [r.most_open for r in opened] == [1, 1, 1, 1]  # float, then each recipe, alone
    assert not any(r.is_open for r in opened) and not list(tmp_path.iterdir())  # all released, the file removed
    floats_calls = runners[stages.TFLITE_FLOAT].calls
    for i, name in enumerate(recipes):  # each recipe's figures are those of a run with it alone beside float
        alone = {stages.TFLITE_FLOAT: HFRunner(tiny_hf, (8, 16), 64), name: HFRunner(tiny_hf, (8, 16), 64, noise=1.0 + i)}
        (_, flt, single) = realtext.perplexity(tiny_llama, tiny_hf, alone, ByteTokenizer(), _text_gates({}), DOCUMENTS)
        assert together[name]["tokens"] == single.metrics["tokens"] == flt.metrics["tokens"]
        for key in ("ppl", "mean_kl", "p99_kl", "top1"):
            assert together[name][key] == pytest.approx(single.metrics[key], rel=1e-12), (name, key)
        assert together[stages.TFLITE_FLOAT]["ppl"] == pytest.approx(flt.metrics["ppl"], rel=1e-12)
        assert alone[stages.TFLITE_FLOAT].calls == floats_calls  # float was read once for all three recipes
    assert together[recipes[2]]["mean_kl"] > together[recipes[0]]["mean_kl"]  # more noise, more KL: each its own


def test_kept_logits_read_back_a_slice_of_rows_at_a_time_the_same_bits(tmp_path):
    """KeptLogits: each piece as written, read from the file a run of rows at a time (so a recipe's pass holds its
    reference's rows, not whole 268 MB pieces), the last run cut at the piece's end."""
    rng = np.random.default_rng(0)
    written = [rng.standard_normal((37, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)]
    kept = realtext.KeptLogits(tmp_path / "float.logits")
    for piece in written:
        kept.write(piece)
    for piece, stored in zip(written, kept.read(), strict=True):
        assert stored.shape == piece.shape
        runs = [stored[row:row + realtext.ROWS] for row in range(0, len(piece), realtext.ROWS)]
        assert np.array_equal(np.concatenate(runs), piece) and runs[-1].dtype == piece.dtype
        assert stored[len(piece):len(piece) + 4].shape == (0, 5)
    with pytest.raises(ValueError, match="runs of rows"):
        next(kept.read())[::2]


def test_greedy_text_names_the_first_difference(tiny_llama, tiny_hf):
    from harness.workload import greedy_trajectory

    prompt = np.array([1, 74, 105, 110, 121], dtype=np.int64)
    traj, _ = greedy_trajectory(tiny_hf, prompt, 6)
    runners = {stages.TFLITE_FLOAT: HFRunner(tiny_hf, (8, 16), 64),
               INT8: HFRunner(tiny_hf, (8, 16), 64, noise=50.0)}
    gates = Gates.from_dict({"models": {"tiny_llama": {s: {realtext.GREEDY_TEXT: {"min_identical": 1.0}}
                                                       for s in runners}}})
    same, noisy = realtext.greedy_text(tiny_llama, runners, [traj], ByteTokenizer(), gates)
    assert same.status == PASS and same.metrics["identical"] == 1.0
    assert noisy.status == FAIL and "prompt 0: HF " in noisy.message
    # without a threshold: the float flatbuffer's text is an error (it must be HF's), a recipe's is reported only
    same, noisy = realtext.greedy_text(tiny_llama, runners, [traj], ByteTokenizer(), Gates.from_dict({}))
    assert (same.status, noisy.status) == (ERROR, INFO)


def test_real_text_on_real_flatbuffers(tiny_llama, tiny_hf, tiny_llama_report):
    """The real-text check on tiny_llama's real float and dynamic_int8 flatbuffers (XNNPack), no stand-in."""
    runners = {stage: tiny_llama_report.state.runners[stage] for stage in (stages.TFLITE_FLOAT, INT8)}
    gates = _text_gates({stages.TFLITE_FLOAT: {"max_ppl_ratio_vs_hf": 1.0001, "max_mean_kl": 1e-6, "min_top1": 1.0},
                         INT8: {"max_mean_kl": 0.1, "min_top1": 0.5}})
    hf, flt, int8 = realtext.perplexity(tiny_llama, tiny_hf, runners, ByteTokenizer(), gates, DOCUMENTS)
    assert (hf.status, flt.status, int8.status) == (PASS, PASS, PASS), [r.message for r in (hf, flt, int8)]
    assert hf.metrics["tokens"] == flt.metrics["tokens"] == int8.metrics["tokens"] > 800
    assert flt.metrics["kl_vs"] == stages.HF and int8.metrics["kl_vs"] == stages.TFLITE_FLOAT
    assert int8.metrics["mean_kl"] > 1e-4  # really quantized, and measured against the float flatbuffer
    assert not any(r.model for r in runners.values())  # released after its last pass
    trajectories = tiny_llama_report.state.trajectories
    text_gates = Gates.from_dict({"models": {"tiny_llama": {stages.TFLITE_FLOAT: {
        realtext.GREEDY_TEXT: {"min_identical": 1.0}}}}})
    (same,) = realtext.greedy_text(tiny_llama, {stages.TFLITE_FLOAT: runners[stages.TFLITE_FLOAT]}, trajectories,
                                   ByteTokenizer(), text_gates)
    assert same.status == PASS and same.metrics["identical"] == 1.0
