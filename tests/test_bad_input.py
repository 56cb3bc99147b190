"""Bad input, interruptions and damaged caches, as a new user meets them: a clear error up front, nothing lost,
never a false PASS. One row per case: the command, its exit code, a fragment of what it says, and what must
still hold afterwards. Runs the real CLI in a subprocess, as a user would; the damaged cache's case, which is
about what a run records, runs it in this process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cache import MANIFEST, file_digest
from tests.scripts import harness_here

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--stages", "hf,reauthored")  # the cheapest real run: no conversion


def harness(*args, cwd=ROOT, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))


def parity(out: Path) -> dict:
    return json.loads((out / "parity.json").read_text())


def records(out: Path) -> dict[tuple[str, str, str], str]:
    return {(r["model"], r["stage"], r["check"]): r["status"] for r in parity(out)["results"]}


def _out_is_a_file(tmp: Path) -> list:
    (tmp / "taken").write_text("mine")
    return ["verify", "--models", "tiny_llama", "--out", tmp / "taken"]


def _file_untouched(tmp: Path, proc) -> None:
    assert (tmp / "taken").read_text() == "mine"
    _nothing(tmp, proc)


def _misspelt_metric(tmp: Path) -> list:
    (tmp / "gates.toml").write_text("[defaults.reauthored.logits]\nmax_abs_eror = 1.0\n")
    return ["verify", "--models", "tiny_llama", "--gates", tmp / "gates.toml", "--out", tmp / "out"]


def _broken_and_unknown(tmp: Path) -> list:
    (tmp / "models").mkdir()
    (tmp / "models" / "half_written.py").write_text("from harness.pairs import ModelPair\nPAIR = ModelPair(\n")
    return ["verify", "--models", "tiny_llama,half_written,tiny_lama", "--models-dir", tmp / "models", *FAST,
            "--out", tmp / "out"]


def _others_ran_and_the_bad_names_are_repeated(tmp: Path, proc) -> None:
    found = records(tmp / "out")
    assert found[("tiny_llama", "reauthored", "logits")] == "pass"
    assert found[("half_written", "hf", "stage")] == "error" and found[("tiny_lama", "hf", "stage")] == "error"
    summary = (tmp / "out" / "summary.md").read_text()
    assert summary.startswith("# edge-parity: FAIL") and "half_written.py is broken: SyntaxError" in summary
    last = proc.stderr.strip().splitlines()[-2:]  # repeated at the end, where it does not scroll away
    assert any("'half_written' did not run" in line for line in last)
    assert any("'tiny_lama' did not run" in line for line in last)


def _broken_file_not_asked_for(tmp: Path) -> list:
    (tmp / "models").mkdir()
    (tmp / "models" / "half_written.py").write_text("raise ImportError('a module this pair needs is missing')\n")
    return ["verify", "--models", "tiny_llama", "--models-dir", tmp / "models", *FAST, "--out", tmp / "out"]


def _the_asked_pair_passed(tmp: Path, proc) -> None:
    assert set(records(tmp / "out").values()) == {"pass"}
    assert parity(tmp / "out")["run"]["status"] == "complete"


def _list_with_broken(tmp: Path) -> list:
    (tmp / "models").mkdir()
    (tmp / "models" / "half_written.py").write_text("def broken(:\n")
    return ["list", "--models-dir", tmp / "models"]


def _lists_the_others(tmp: Path, proc) -> None:
    assert "tiny_llama" in proc.stdout and re.search(r"^half_written +BROKEN +SyntaxError", proc.stdout, re.M)


def _nothing(tmp: Path, proc) -> None:
    """A usage error: one line, said before any work (no pair ran, no library banner around it)."""
    assert not (tmp / "out").exists() and "[tiny_llama]" not in proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if line.startswith("error:")] != []


def _help_for_users(tmp: Path, proc) -> None:
    assert "SUPPRESS" not in proc.stdout and "_verify" not in proc.stdout
    assert "exit codes:" in proc.stdout and "130  interrupted" in proc.stdout
    assert "Hugging Face" in proc.stdout or "(default: the suite's pairs)" in proc.stdout


BAD_INPUT = [
    # id, the command (given a fresh tmp dir), exit code, a fragment of stderr/stdout, what holds afterwards
    ("out-is-a-file", _out_is_a_file, 2, "is a file; pass a directory", _file_untouched),
    # /sys refuses every write though its permission bits say root may: what a read-only file system does too
    ("out-not-writable", lambda tmp: ["verify", "--models", "tiny_llama", "--out", "/sys/edge-parity"], 2,
     "cannot write in /sys", _nothing),
    ("threads-0", lambda tmp: ["verify", "--models", "tiny_llama", "--threads", "0", "--out", tmp / "out"], 2,
     "--threads 0: give positive integers", _nothing),
    ("misspelt-metric", _misspelt_metric, 2, "did you mean 'max_max_abs_err'?", _nothing),
    ("broken-and-unknown-pairs", _broken_and_unknown, 2, "half_written.py is broken: SyntaxError",
     _others_ran_and_the_bad_names_are_repeated),
    ("broken-file-not-asked-for", _broken_file_not_asked_for, 0, "half_written.py is broken: ImportError",
     _the_asked_pair_passed),
    ("list-with-a-broken-file", _list_with_broken, 0, "BROKEN", _lists_the_others),
    ("help", lambda tmp: ["--help"], 0, "exit codes:", _help_for_users),
    ("verify-help", lambda tmp: ["verify", "--help"], 0, "report directory (default reports/latest)",
     _help_for_users),
]


@pytest.mark.parametrize("command, code, fragment, afterwards", [row[1:] for row in BAD_INPUT],
                         ids=[row[0] for row in BAD_INPUT])
def test_bad_input(tmp_path, command, code, fragment, afterwards):
    proc = harness(*command(tmp_path))
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert fragment in proc.stdout + proc.stderr
    afterwards(tmp_path, proc)


def test_a_read_only_file_system_is_refused_up_front(tmp_path):
    """The same as /sys above, on a real read-only mount (needs the right to mount: skipped elsewhere)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        proc = harness("verify", "--models", "tiny_llama", "--out", mount / "reports")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    assert proc.returncode == 2 and "(Read-only file system)" in proc.stderr


# ------------------------------------------------------------------ Ctrl-C


def _interrupted(args: list[str], who: str, ready) -> None:
    """Runs `harness verify ARGS` as from a terminal and presses Ctrl-C once `ready(line)` says so: `terminal`
    signals the whole process group as a terminal's Ctrl-C does; `parent` signals the harness alone. Asserts
    the clean stop (exit 130, no traceback)."""
    proc = subprocess.Popen([sys.executable, "-m", "harness", "verify", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            # As from a terminal: Ctrl-C acts (a job a script started in the background
                            # inherits it ignored, and then neither the harness nor its child stops).
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if ready(line):
            if who == "terminal":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest


@pytest.mark.parametrize("who", ["terminal", "parent"])
def test_ctrl_c_keeps_what_finished_and_reads_interrupted(tmp_path, who):
    """Ctrl-C while the second of two pairs runs: the first pair's records and the second's finished stages are
    written, the report says INTERRUPTED (exit 130), the cache holds no half-built entry. `parent`: the
    harness stops its child."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    _interrupted(["--models", "tiny_llama,smollm2", *FAST, "--jobs", "1", "--out", str(out), "--cache-dir", str(cache)],
                 who, lambda line: line.startswith("[smollm2] hf"))  # one stage of the second pair has finished
    document = parity(out)
    assert document["run"]["status"] == "interrupted"
    found = records(out)
    assert found[("tiny_llama", "reauthored", "logits")] == "pass"
    assert found[("smollm2", "hf", "sensitivity")] == "pass"
    assert found[("smollm2", "reauthored", "stage")] == "not_run"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# edge-parity: INTERRUPTED") and "Interrupted (Ctrl-C) during smollm2" in summary
    _assert_whole(cache)


@pytest.mark.parametrize("who", ["terminal", "parent"])
def test_ctrl_c_stops_pairs_running_side_by_side_and_keeps_what_each_finished(tmp_path, who):
    """--jobs 2: Ctrl-C once both pairs have finished hf stops both children (a terminal's reaches them itself;
    the harness alone signalled stops them); each pair keeps its finished stages and gets a not-run record for
    the stage it was in; the report says INTERRUPTED during both (exit 130), the cache holds no half-built entry."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    started = set()

    def both_started(line: str) -> bool:  # each has finished hf, neither has reached exported's end
        if line.startswith(("[tiny_llama] hf", "[smollm2] hf")):
            started.add(line.split("]")[0][1:])
        return len(started) == 2

    _interrupted(["--models", "tiny_llama,smollm2", "--stages", "hf,reauthored,exported", "--jobs", "2",
                  "--out", str(out), "--cache-dir", str(cache)], who, both_started)
    document = parity(out)
    assert document["run"]["status"] == "interrupted" and document["run"]["jobs"] == 2
    for model in ("tiny_llama", "smollm2"):
        mine = [r for r in document["results"] if r["model"] == model]
        assert any(r["stage"] == "hf" and r["check"] == "sensitivity" and r["status"] == "pass" for r in mine)
        stopped = [r for r in mine if r["status"] == "not_run"]
        assert len(stopped) == 1 and stopped[0]["message"].startswith("interrupted during"), [
            (r["stage"], r["check"], r["status"], r["message"]) for r in mine]  # the message says why, in CI's log
    assert "Interrupted (Ctrl-C) during" in (out / "summary.md").read_text()
    _assert_whole(cache)


def _assert_whole(cache: Path) -> None:
    """Every entry of the cache is whole (its manifest matches), and no staging directory was left behind."""
    for kind in cache.iterdir():
        if kind.is_dir():
            for entry in (e for e in kind.iterdir() if e.is_dir()):  # beside each entry: its lock file
                assert not entry.name.startswith("."), f"staging directory left: {entry.name}"
                manifest = json.loads((entry / MANIFEST).read_text())
                assert {name: file_digest(entry / name) for name in manifest} == manifest


def test_a_report_written_mid_run_never_reads_pass(tmp_path):
    """While pairs remain, the report on disk lists them as not run and says INCOMPLETE: a run killed outright
    (no chance to say INTERRUPTED) still cannot be mistaken for a pass."""
    from harness import report
    from harness.records import RUNNING, CheckResult, run_metadata

    ran = [CheckResult("tiny_llama", "reauthored", "logits", "pass")]
    waiting = [CheckResult("smollm2", "hf", "stage", "not_run", message="not run: the run has not reached this pair")]
    document = report.parity_document({**run_metadata(), "status": RUNNING}, ran + waiting, {})
    assert report.overall(document) == "incomplete"
    assert report.render_summary(document).startswith("# edge-parity: INCOMPLETE")
    assert not report.release_summary(document)["ready"]
    document = report.parity_document({**run_metadata(), "status": RUNNING}, ran, {})
    assert report.overall(document) == "incomplete"  # nothing pending, yet the run never said it finished


# ------------------------------------------------------------------ damaged cache


def test_a_damaged_flatbuffer_and_checkpoint_are_rebuilt(tmp_path, tiny_llama_report):
    """Truncate a cached flatbuffer and flip one bit of a cached checkpoint: the next run verifies every hit
    against the digest recorded when the entry was built, rebuilds both, says so, and passes."""
    from harness.cache import ArtifactCache, cache_key
    from harness.config import default_cache_dir
    from harness.convert import modules_key
    from harness.lowering import LOWERED_KIND

    artifacts = tiny_llama_report.notes["artifacts"]
    cache = tmp_path / "cache"
    # A warm cache of this pair's entries, copied from the shared one: the exported programs and their lowered
    # modules the flatbuffer is rebuilt from too (a conversion reads them), left whole.
    shared = ArtifactCache(Path(default_cache_dir()))
    state = tiny_llama_report.state
    modules = f"{LOWERED_KIND}/" + cache_key(modules_key(state.pair, state.checkpoint, shared.code_digests(), True))
    for key in (*(artifacts[stage]["key"] for stage in ("checkpoint", "exported", "tflite_float")), modules):
        shutil.copytree(shared.root / key, cache / key)
    flatbuffer = next((cache / artifacts["tflite_float"]["key"]).glob("*.tflite"))
    flatbuffer.write_bytes(flatbuffer.read_bytes()[: flatbuffer.stat().st_size // 2])
    weights = next((cache / artifacts["checkpoint"]["key"]).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's values: still a readable file, silently different weights
    weights.write_bytes(bytes(data))

    # what the run records is the point here, not its process: in this one (a new process re-imports for ~9 s)
    proc = harness_here("verify", "--models", "tiny_llama", "--stages", "tflite_float", "--quant", "none",
                        "--cache-dir", cache, "--out", tmp_path / "out", "--in-process")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert set(records(tmp_path / "out").values()) == {"pass"}
    notes = parity(tmp_path / "out")["models"]["tiny_llama"]["notes"]
    assert notes["cache"]["rebuilt_damaged"] == 2 and notes["cache"]["hits"] == 2  # the programs and modules, whole
    assert notes["artifacts"]["tflite_float"]["sha256"] == artifacts["tflite_float"]["sha256"]
    assert file_digest(flatbuffer) == artifacts["tflite_float"]["sha256"]
