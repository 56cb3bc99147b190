"""Localisation inside a flatbuffer (harness/tflite_points.py, localise.localise_tflite): the interpreter's
intermediate tensors found by module scope agree with the eager model on a clean pair, and a defect only the
flatbuffer has is found at its layer, by the divergence step of a failing run and by `harness explain`."""

import pytest

from harness import cli, localise, stages
from harness.checkpoint import build_reauthored, load_hf, reference_checkpoint
from harness.convert import FLOAT, convert
from harness.pipeline import verify_pair
from harness.records import FAIL, INFO, PASS
from harness.workload import greedy_trajectory, make_prompts
from tests import variants
from tests.scripts import run_repro

READABLE = ("input_norm", "attention.output", "attention.projection", "post_attention_norm", "mlp.gate", "mlp.up",
            "mlp.activation", "mlp.down")  # per layer: what tiny_llama's flatbuffer computes as [position, features] in a scope


def test_scopes_follow_the_converters_tensor_names(tiny_llama, cache):
    from harness.tflite_points import scope_of

    model, _ = build_reauthored(tiny_llama, reference_checkpoint(tiny_llama, cache), tiny_llama.export.kv_cache_max)
    assert scope_of(model, "transformer_blocks.1.ff.w2") == (
        "litert_torch.generative.layers.attention.TransformerBlock_1/"  # the ModuleList adds only the index
        "litert_torch.generative.layers.feed_forward.GatedFeedForward_ff/torch.nn.modules.linear.Linear_w2")


@pytest.mark.parametrize("prompt", [0, 2])
def test_a_clean_flatbuffer_diverges_nowhere_at_every_readable_point(tiny_llama, cache, gates, prompt):
    checkpoint = reference_checkpoint(tiny_llama, cache)
    hf_model = load_hf(tiny_llama, checkpoint)
    model, _ = build_reauthored(tiny_llama, checkpoint, tiny_llama.export.kv_cache_max)
    flatbuffer = convert(tiny_llama, model, checkpoint, FLOAT, cache)
    trajectory, _ = greedy_trajectory(hf_model, make_prompts(tiny_llama)[prompt], tiny_llama.workload.new_tokens)
    divergence = localise.localise_tflite(tiny_llama, model, flatbuffer, trajectory.tokens[:-1],
                                          localise.tolerance(gates, tiny_llama, stages.TFLITE_FLOAT))
    assert divergence.first is None, localise.describe(divergence)
    names = [e.point.name for e in divergence.errors]
    expected = ["embedding", *(f"layers.{i}.{p}" for i in range(2) for p in READABLE), "final_norm", "logits"]
    assert names == expected
    errors = [e.error for e in divergence.errors]
    assert max(errors) < divergence.tolerance / 10 and max(errors) > 0  # builtin kernels: float noise, not zero


@pytest.mark.parametrize("name, count, absent", [
    ("phi2", 15, "head"),  # its Linears drop the batch ([positions, features]): read as well
    ("gemma2", 23, "head"),  # its head's weights carry the soft-cap's 1/cap folded in: not the module's output
])
def test_other_families_flatbuffers_diverge_nowhere(name, count, absent, pairs, cache, gates):
    pair = pairs[name]
    checkpoint = reference_checkpoint(pair, cache)
    hf_model = load_hf(pair, checkpoint)
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    trajectory, _ = greedy_trajectory(hf_model, make_prompts(pair)[0], pair.workload.new_tokens)
    divergence = localise.localise_tflite(pair, model, convert(pair, model, checkpoint, FLOAT, cache),
                                          trajectory.tokens[:-1], localise.tolerance(gates, pair, stages.TFLITE_FLOAT))
    assert divergence.first is None, localise.describe(divergence)
    names = [e.point.name for e in divergence.errors]
    assert len(names) == count and absent not in names and "layers.1.mlp.down" in names, names


def _skewed_layer_1_down(path):
    return variants.scale_flatbuffer_weights(path, path, block=1, linear="w2", factor=1.05)


def test_a_tflite_only_weight_skew_is_localised_at_its_layer_by_the_divergence_step(tiny_llama, private_conversion,
                                                                                    monkeypatch):
    """Layer 1's MLP down-projection weights 5% too large in the flatbuffer only: the float stage fails, the
    divergence step names layer 1's down projection, and every point before it agrees."""
    moved = variants.converting_with(monkeypatch, _skewed_layer_1_down)
    rep = verify_pair(tiny_llama, private_conversion.derive(quant=(), stages=(stages.TFLITE_FLOAT,)))
    assert moved == [1]  # one weight buffer, shared by every signature
    by_check = {(r.stage, r.check): r for r in rep.results}
    assert by_check[(stages.REAUTHORED, stages.LOGITS)].status == PASS
    assert by_check[(stages.TFLITE_FLOAT, stages.LOGITS)].status == FAIL
    records = [r for r in rep.results if r.check == stages.DIVERGENCE]
    assert [(r.stage, r.status) for r in records] == [(stages.TFLITE_FLOAT, INFO)]
    metrics = records[0].metrics
    assert (metrics["point"], metrics["layer"], metrics["position"]) == ("layers.1.mlp.down", 1, 0), records[0].message
    assert records[0].message.startswith("first divergence: tflite_float, layer 1 MLP down projection, position 0 (")
    points = list(metrics["points"])
    before = [metrics["points"][p] for p in points[:points.index("layers.1.mlp.down")]]
    assert len(before) >= 10 and max(before) < metrics["tolerance"]
    assert metrics["error"] == pytest.approx(0.05, rel=0.05)  # the planted 5%, as the tensor's scale sees it


def test_explain_tflite_float_names_the_skewed_layer(tmp_path, monkeypatch, capsys):
    variants.converting_with(monkeypatch, _skewed_layer_1_down)
    code = cli.main(["explain", "--models", "tiny_llama", "--stage", "tflite_float", "--no-cache",  # private build
                     "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "first divergence: tflite_float, layer 1 MLP down projection, position 0 (" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("layers.")}
    assert table["layers.1.mlp.down"][-1] == "DIVERGES" and len(table["layers.1.mlp.up"]) == 2
    # The reproduction runs the flatbuffer that diverged, copied beside it: the patched converter is gone in its
    # process, and a rebuild would be clean.
    assert (tmp_path / "out" / "repro_tiny_llama_tflite_float.tflite").is_file()
    stdout, parent, stage = run_repro(tmp_path / "out" / "repro_tiny_llama_tflite_float.py")
    assert "tiny_llama tflite_float at layers.1.mlp.down on prompt 0" in stdout
    assert "first position past 0.0001: 0" in stdout
    assert stage == pytest.approx(parent * 1.05, rel=1e-3)


def test_explain_tflite_float_on_a_clean_pair_says_nothing_diverges(tmp_path, capsys):
    code = cli.main(["explain", "--models", "tiny_llama", "--stage", "tflite_float", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "nothing diverges: 19 matched points within 0.0001" in out
