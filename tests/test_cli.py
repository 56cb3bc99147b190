"""The CLI as a user runs it: exit codes, reports on disk, caching, crash isolation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, golden
from harness.config import RunConfig
from tests.scripts import harness_here
from tests.test_pipeline import ALL_STAGES, CLEAN_NOT_PASSED

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ROOT / "tests" / "fixtures" / "broken_models"


def harness(*args, cwd=ROOT, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def statuses(out_dir):
    data = json.loads((Path(out_dir) / "parity.json").read_text())
    return {(r["model"], r["stage"], r["check"]): r["status"] for r in data["results"]}, data


def test_verify_tiny_llama_passes_and_writes_reports(tmp_path, tiny_llama_report):
    # tiny_llama_report warmed the shared cache, so this run re-uses its conversions
    proc = harness("verify", "--models", "tiny_llama", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found, data = statuses(tmp_path)
    assert {stage for (_, stage, _) in found} == ALL_STAGES  # the bundle stages included, by default
    assert {(stage, check): status for (_, stage, check), status in found.items() if status != "pass"} == CLEAN_NOT_PASSED
    assert data["models"]["tiny_llama"]["notes"]["cache"]["misses"] == 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# edge-parity: PASS") and "| tflite_float" in summary
    assert "[tiny_llama] stablehlo" in proc.stdout  # a progress line per stage
    # Provenance: the harness commit, and the digest of every artifact the verdict is about.
    assert set(data["run"]["harness"]) == {"commit", "dirty"}
    from harness.suite import torch_threads

    assert data["run"]["jobs"] == 1 and data["run"]["torch_threads"] == torch_threads(2)  # -j's default, not 1 pair's
    assert data["models"]["tiny_llama"]["notes"]["torch_threads"] == data["run"]["torch_threads"]  # as the child ran
    artifacts = data["models"]["tiny_llama"]["notes"]["artifacts"]
    assert {"checkpoint", "tflite_float", "tflite_dynamic_int8"} <= set(artifacts)
    assert all(len(artifacts[s]["sha256"]) == 64 for s in ("tflite_float", "tflite_dynamic_int8"))
    # No absolute path of this machine in what a run writes.
    from harness.config import default_cache_dir

    for text in (summary, (tmp_path / "parity.json").read_text()):
        for machine_path in {str(ROOT), str(Path.home()), default_cache_dir(), str(tmp_path)}:
            assert machine_path not in text, machine_path


def test_broken_pair_exits_1_at_the_right_stage(tmp_path):
    proc = harness_here("verify", "--models", "tiny_llama_bad_rope", "--models-dir", str(BROKEN),
                        "--stages", "hf,reauthored", "--out", str(tmp_path), "--in-process")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found, _ = statuses(tmp_path)
    assert found[("tiny_llama_bad_rope", "reauthored", "logits")] == "fail"
    assert found[("tiny_llama_bad_rope", "hf", "sensitivity")] == "pass"


def test_a_crashing_model_loses_nothing_else(tmp_path):
    proc = harness("verify", "--models", "tiny_llama_crashes,tiny_llama", "--models-dir", str(BROKEN),
                   "--stages", "hf,reauthored", "--out", str(tmp_path))
    assert proc.returncode == 1
    found, data = statuses(tmp_path)
    crashed = [r for r in data["results"] if r["model"] == "tiny_llama_crashes" and r["status"] == "error"]
    assert len(crashed) == 1 and "died with exit code 9 during reauthored" in crashed[0]["message"]
    assert crashed[0]["stage"] == "reauthored"
    # What the dead process finished before it died is kept, and so is every other model.
    assert found[("tiny_llama_crashes", "hf", "sensitivity")] == "pass"
    assert found[("tiny_llama", "reauthored", "logits")] == "pass"


MISSPELT_TABLE = "[defaults.tflite_dynamic_int8.quant_acuracy]\nmax_mean_kl = 9.0\n"
MISSPELT_MODEL = "[models.tiny_lama.reauthored.logits]\nmax_max_abs_err = 1.0\n"


@pytest.mark.parametrize("args, fragment", [
    (["--gates", "/nonexistent/gates.toml"], "gates file /nonexistent/gates.toml does not exist"),
    (["--gates", MISSPELT_TABLE], "[defaults.tflite_dynamic_int8.quant_acuracy] is not a check of stage "
                                  "tflite_dynamic_int8 (did you mean 'quant_accuracy'?)"),
    (["--gates", MISSPELT_MODEL], "[models.tiny_lama] names no known model pair (did you mean 'tiny_llama'?)"),
    (["--quant", "int3"], "unknown quant recipe(s) int3"),
    (["--stages", "tflite_magic"], "unknown stage(s) tflite_magic"),
])
def test_bad_configuration_exits_2_with_one_line(tmp_path, args, fragment):
    if args[0] == "--gates" and args[1].startswith("["):  # a gates file with this text
        (tmp_path / "gates.toml").write_text(args[1])
        args = ["--gates", str(tmp_path / "gates.toml")]
    proc = harness("verify", "--models", "tiny_llama", "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert len([l for l in proc.stderr.splitlines() if l.startswith("error:")]) == 1


def test_conversions_are_cached_and_no_cache_rebuilds_privately(tmp_path):
    args = ["verify", "--models", "tiny_llama", "--stages", "tflite_float", "--quant", "none",
            "--cache-dir", str(tmp_path / "cache"), "--in-process"]
    first = harness_here(*args, "--out", str(tmp_path / "a"))
    second = harness_here(*args, "--out", str(tmp_path / "b"))
    def entries():  # the entry directories and their mtimes (beside each: its lock file)
        return {p: p.stat().st_mtime_ns for kind in ("tflite", "lowered", "exported", "reference", "checkpoint")
                for p in (tmp_path / "cache" / kind).iterdir() if p.is_dir()}

    shared = entries()
    forced = harness_here(*args, "--out", str(tmp_path / "c"), "--no-cache")
    cache = {}
    for name, proc in (("a", first), ("b", second), ("c", forced)):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cache[name] = statuses(tmp_path / name)[1]["models"]["tiny_llama"]["notes"]["cache"]
    # The checkpoint, HF's reference run, the exported programs and their lowered modules (the flatbuffer is made
    # from them) and the float flatbuffer; a run served the flatbuffer reads neither programs nor modules.
    assert cache["a"]["misses"] == 5
    assert cache["b"] == {"hits": 3, "misses": 0, "rebuilt_damaged": 0}
    assert cache["c"]["misses"] == 5
    # --no-cache built privately: the shared entries are still the first run's, and nothing was added
    assert len(shared) == 5
    assert entries() == shared


HEAVY = ("torch", "tensorflow", "litert_torch", "transformers", "ai_edge_litert")


@pytest.mark.parametrize("argv", [["list"], ["verify", "--threads", "0"], ["verify", "--quant", "int3"]])
def test_listing_and_usage_errors_import_no_heavy_library(argv):
    """`harness list`, --help and bad usage answer at once: no torch, TensorFlow or litert-torch is imported."""
    code = ("import sys\nfrom harness import cli\ncode = cli.main(%r)\n"
            "print('HEAVY', sorted(m for m in %r if m in sys.modules), code)" % (argv, HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = next(l for l in proc.stdout.splitlines() if l.startswith("HEAVY"))
    assert line.startswith("HEAVY []"), (line, proc.stderr[-500:])
    assert line.endswith(" 0" if argv == ["list"] else " 2")


def test_list_shows_pairs_stages_and_recipes():
    proc = harness("list")
    assert proc.returncode == 0
    for word in ("tiny_llama", "GQA", "stablehlo", "tflite_<recipe>", "dynamic_int4_block128"):
        assert word in proc.stdout


# ------------------------------------------------------------------ goldens and the release gate, in-process


def test_verify_against_golden_writes_the_release_summary(tiny_llama, tiny_llama_report, recorded, tmp_path):
    common = ["verify", "--models", "tiny_llama", "--stages", "reauthored", "--in-process", "--quant", "none"]
    assert cli.main(common + ["--against", "golden", "--golden-dir", str(recorded), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "release.md").read_text().startswith("# Release readiness: READY")
    document = json.loads((tmp_path / "a" / "parity.json").read_text())
    assert document["release"]["ready"] and not document["release"]["changed"]
    assert cli.main(common + ["--against", "golden", "--golden-dir", str(tmp_path / "none"),
                              "--out", str(tmp_path / "b")]) == 1
    release = json.loads((tmp_path / "b" / "parity.json").read_text())["release"]
    assert not release["ready"] and "no golden for tiny_llama" in release["stages"][0]["message"]
    assert cli.main(common + ["--golden-dir", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 0
    assert not (tmp_path / "c" / "release.md").exists()


def test_golden_options_reach_the_child_process(tmp_path):
    """What a child is handed is the parent's RunConfig, golden settings included, and it builds the same check."""
    from harness import suite

    args = cli.build_parser().parse_args(["verify", "--golden-dir", str(tmp_path), "--against", "golden"])
    config = RunConfig.from_cli(args, "verify")
    again = RunConfig.from_json(config.to_json())
    assert again == config
    (check,) = [c for c in suite.verify_checks(again) if isinstance(c, golden.GoldenCheck)]
    assert check.golden_dir == tmp_path and check.strict


def test_force_needs_a_reason():
    assert cli.main(["golden", "update", "--models", "tiny_llama", "--force"]) == cli.EXIT_USAGE
