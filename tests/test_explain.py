"""`harness explain` (harness/explain.py) as a user runs it: the table, the curve, a reproduction that runs on its
own, nothing diverging on a clean pair, and one-line errors for bad input."""

from pathlib import Path

import pytest

from harness import cli
from tests.scripts import ROOT, run, run_repro

BROKEN = ROOT / "tests" / "fixtures" / "broken_models"


def test_explain_names_the_divergence_and_writes_a_curve_and_a_repro_that_runs(tmp_path):
    proc = run(["-m", "harness", "explain", "--models", "tiny_llama_bad_rope", "--models-dir", str(BROKEN),
                "--out", str(tmp_path)])
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "first divergence: reauthored, layer 0 q after RoPE, position 1 (" in proc.stdout
    table = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
             if line.startswith(("layers.", "head", "logits"))}
    assert table["layers.0.attention.q_rope"][-1] == "DIVERGES" and len(table["layers.0.attention.q"]) == 2  # agrees
    png = tmp_path / "divergence_tiny_llama_bad_rope_reauthored.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    script = tmp_path / "repro_tiny_llama_bad_rope_reauthored.py"
    text = script.read_text()
    for machine_path in (str(ROOT), str(Path.home()), str(tmp_path)):
        assert machine_path not in text
    # The reproduction runs on its own, from anywhere, and shows the same point diverging at the same position.
    stdout, hf_value, ours = run_repro(script)
    assert "tiny_llama_bad_rope reauthored at layers.0.attention.q_rope on prompt 0" in stdout
    assert "first position past 0.0001: 1" in stdout
    assert abs(hf_value - ours) > 1e-3


def test_explain_on_a_clean_pair_says_nothing_diverges_and_prints_every_point(tmp_path, capsys):
    code = cli.main(["explain", "--models", "tiny_llama", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "nothing diverges: 30 matched points within 0.0001" in out
    errors = [float(line.split()[1]) for line in out.splitlines()
              if line.startswith(("layers.", "embedding", "final_norm", "head", "logits"))]
    assert len(errors) == 30 and max(errors) < 1e-5 and max(errors) > 0  # real float noise, printed
    assert (tmp_path / "divergence_tiny_llama_reauthored.png").exists()
    assert not list(tmp_path.glob("repro_*.py"))  # nothing to reproduce


def test_explain_exported_finds_an_export_only_skew_and_its_repro_shows_it(tmp_path, capsys):
    planted = ROOT / "tests" / "fixtures" / "planted_defects"
    code = cli.main(["explain", "--models", "tiny_llama_skewed_when_exported", "--models-dir", str(planted),
                     "--stage", "exported", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "first divergence: exported, output logits, position 0 (0.01, tolerance 0.0001)" in out
    script = tmp_path / "repro_tiny_llama_skewed_when_exported_exported.py"
    stdout, parent, stage = run_repro(script)
    assert "tiny_llama_skewed_when_exported exported at logits on prompt 0 (12 positions)" in stdout
    assert "first position past 0.0001: 0" in stdout
    assert stage == pytest.approx(parent * 1.01, rel=1e-4)  # the planted skew, exactly


def test_explain_stablehlo_finds_a_lowering_only_defect_and_its_repro_shows_it(tmp_path, capsys):
    """The planted custom op lowered x1.05 lives in its pair file, so the reproduction, run on its own in a new
    process, lowers it the same wrong way."""
    planted = ROOT / "tests" / "fixtures" / "planted_defects"
    code = cli.main(["explain", "--models", "tiny_llama_lowered_wrong", "--models-dir", str(planted),
                     "--stage", "stablehlo", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "first divergence: stablehlo, layer 1 MLP down projection, position 0 (0.05, tolerance 0.0001)" in out
    script = tmp_path / "repro_tiny_llama_lowered_wrong_stablehlo.py"
    stdout, parent, stage = run_repro(script)
    assert "tiny_llama_lowered_wrong stablehlo at layers.1.mlp.down on prompt 0" in stdout
    assert "first position past 0.0001: 0" in stdout
    assert stage == pytest.approx(parent * 1.05, rel=1e-4)


@pytest.mark.parametrize("args, fragment", [
    (["--models", "tiny_lama"], "unknown model pair 'tiny_lama'"),
    (["--models", "tiny_llama,phi2"], "explain localises one pair"),
    (["--models", "tiny_llama", "--stage", "tflite_magic"], "--stage tflite_magic is not a stage"),
    (["--models", "tiny_llama", "--stage", "hf"], "--stage hf has no localiser yet; explain localises: "
                                                  "reauthored, exported, stablehlo, tflite_float"),
    (["--models", "tiny_llama", "--prompt", "7"], "--prompt 7: pair tiny_llama has prompts 0..2"),
])
def test_bad_input_is_one_line_and_exit_2_with_no_heavy_library(tmp_path, args, fragment):
    heavy = ("torch", "tensorflow", "litert_torch", "transformers", "ai_edge_litert")
    code = ("import sys\nfrom harness import cli\ncode = cli.main(%r)\n"
            "print('HEAVY', sorted(m for m in %r if m in sys.modules), code)"
            % (["explain", *args, "--out", str(tmp_path)], heavy))
    proc = run(["-c", code])
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY [] 2", proc.stdout + proc.stderr[-1000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
