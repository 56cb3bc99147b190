"""The artifact cache: keys cover the code that builds an artifact, private builds never publish, damage is rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import provenance, stages
from harness.cache import ArtifactCache, cache_key, file_digest
from harness.checkpoint import checkpoint_key
from harness.config import RunConfig
from harness.pipeline import RunOptions, verify_pair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_library(tmp_path, monkeypatch):
    """An installed distribution `fakeconv` (dist-info + package) on sys.path, as pip would lay it out."""
    site = tmp_path / "site"
    package = site / "fakeconv"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = '1.0'\n")
    (package / "lower.py").write_text("def lower(x):\n    return x\n")
    info = site / "fakeconv-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeconv\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("fakeconv\n")
    monkeypatch.syspath_prepend(str(site))
    yield package
    sys.modules.pop("fakeconv", None)


def test_a_patched_library_with_the_same_version_gets_another_digest(fake_library, tmp_path):
    memo = tmp_path / "memo.json"
    before = provenance.code_digests(memo, ("fakeconv",))["fakeconv"]
    assert provenance.code_digests(memo, ("fakeconv",))["fakeconv"] == before  # same files, same digest
    (fake_library / "lower.py").write_text("def lower(x):\n    return 2 * x  # a converter fix under test\n")
    after = provenance.code_digests(memo, ("fakeconv",))["fakeconv"]
    assert after != before
    assert json.loads(memo.read_text())["fakeconv"]["digest"] == after
    assert provenance.code_digests(None, ("nothing-installed",)) == {"nothing-installed": "absent"}


def test_every_converter_library_is_in_the_conversion_key(cache):
    libraries = cache.code_digests()
    assert set(libraries["code"]) == set(provenance.CONVERTER_LIBRARIES)
    assert all(len(d) == 64 for d in libraries["code"].values()), libraries["code"]
    assert {"torch", "transformers"} <= set(libraries["versions"])


def test_the_checkpoint_key_covers_the_init_code(tiny_llama, monkeypatch):
    from harness import checkpoint

    before = checkpoint_key(tiny_llama)

    def sensitize(model, std, seed):  # another init: the same name, other code
        return None

    monkeypatch.setattr(checkpoint, "sensitize", sensitize)
    assert cache_key(checkpoint_key(tiny_llama)) != cache_key(before)


def _build(text):
    def build(out):
        (out / "artifact.bin").write_text(text)
    return build


def test_a_damaged_entry_is_rebuilt_not_served(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.get_or_build("tflite", {"k": 1}, _build("good"))
    (entry / "artifact.bin").write_text("goo")  # truncated
    again = ArtifactCache(tmp_path)
    entry = again.get_or_build("tflite", {"k": 1}, _build("good"))
    assert (entry / "artifact.bin").read_text() == "good"
    assert again.rebuilt == [f"tflite/{cache_key({'k': 1})}"] and again.misses == again.rebuilt
    third = ArtifactCache(tmp_path)
    third.get_or_build("tflite", {"k": 1}, _build("good"))
    assert third.hits and not third.rebuilt


def test_a_private_cache_never_publishes_nor_replaces_a_shared_entry(tmp_path):
    shared = ArtifactCache(tmp_path)
    entry = shared.get_or_build("tflite", {"k": 1}, _build("shared"))
    stamp = (entry / "artifact.bin").stat().st_mtime_ns
    with ArtifactCache(tmp_path, shared=False) as private:
        built = private.get_or_build("tflite", {"k": 1}, _build("patched library's output"))
        assert (built / "artifact.bin").read_text() == "patched library's output"
        assert private.misses and not private.hits  # a private run always builds afresh
        other = private.get_or_build("tflite", {"k": 2}, _build("new"))
        assert not str(other).startswith(str(tmp_path))
    assert not built.exists()  # removed with the run
    assert (entry / "artifact.bin").read_text() == "shared" and (entry / "artifact.bin").stat().st_mtime_ns == stamp
    assert not (tmp_path / "tflite" / cache_key({"k": 2})).exists()


def test_a_private_cache_borrows_only_the_kinds_it_names_and_still_never_publishes(tmp_path):
    shared = ArtifactCache(tmp_path)
    checkpoint = shared.get_or_build("checkpoint", {"k": 1}, _build("weights"))
    shared.get_or_build("tflite", {"k": 1}, _build("shared"))
    with ArtifactCache(tmp_path, shared=False, borrow=("checkpoint",)) as private:
        assert private.get_or_build("checkpoint", {"k": 1}, _build("rebuilt")) == checkpoint  # served, not built
        flatbuffer = private.get_or_build("tflite", {"k": 1}, _build("patched converter's output"))
        assert (flatbuffer / "artifact.bin").read_text() == "patched converter's output"  # not borrowed: built
        fresh = private.get_or_build("checkpoint", {"k": 2}, _build("new weights"))  # a miss builds privately
        assert not str(fresh).startswith(str(tmp_path)) and not str(flatbuffer).startswith(str(tmp_path))
        (checkpoint / "artifact.bin").write_text("damaged")  # a damaged shared entry is not served, nor repaired
        rebuilt = private.get_or_build("checkpoint", {"k": 1}, _build("rebuilt"))
        assert (rebuilt / "artifact.bin").read_text() == "rebuilt" and not str(rebuilt).startswith(str(tmp_path))
        assert private.hits == [f"checkpoint/{cache_key({'k': 1})}"]
    assert (checkpoint / "artifact.bin").read_text() == "damaged"
    assert not (tmp_path / "checkpoint" / cache_key({"k": 2})).exists()
    with pytest.raises(ValueError, match="only a private cache"):
        ArtifactCache(tmp_path, borrow=("checkpoint",))


def test_keys_hold_no_directory_of_this_machine(tiny_llama, cache):
    """Same inputs, same key in every checkout and environment. A key that held where the libraries are installed
    (the describer read `sysconfig`'s paths) missed in every new clone and CI job: each re-converted everything."""
    from pathlib import Path

    from harness.checkpoint import reference_checkpoint
    from harness.convert import FLOAT, artifact_key
    from harness.paths import PROJECT_ROOT

    keys = {"flatbuffer": artifact_key(tiny_llama, reference_checkpoint(tiny_llama, cache), FLOAT, cache.code_digests()),
            "checkpoint": checkpoint_key(tiny_llama)}
    for kind, parts in keys.items():
        text = json.dumps(parts, default=str)
        for where in {sys.prefix, sys.base_prefix, str(PROJECT_ROOT), str(Path.home())}:
            assert where not in text, f"the {kind} key holds {where}"
        assert "$PYTHON_PREFIX" in text or kind == "checkpoint"  # the libraries' location is kept, by its label


def test_the_stablehlo_key_covers_the_harness_lowering_code(tiny_llama, cache, monkeypatch):
    """The lowered StableHLO is cached: editing how the harness resolves litert-torch's markers (or anything
    lower_programs reads) must miss, never serve the module the old code lowered; and a float flatbuffer, made from
    the lowered modules, misses when the lowering's code changes, not when the stage's resolution does."""
    from harness import lowering
    from harness.checkpoint import reference_checkpoint
    from harness.convert import artifact_key, lowering_key

    checkpoint = reference_checkpoint(tiny_llama, cache)
    before = lowering_key(tiny_llama, checkpoint, cache.code_digests(), True, ("prefill_8",))
    assert cache_key(lowering_key(tiny_llama, checkpoint, cache.code_digests(), True, ("prefill_16",))) != cache_key(before)
    assert cache_key(lowering_key(tiny_llama, checkpoint, cache.code_digests(), False, ("prefill_8",))) != cache_key(
        before)  # weights as arguments

    def resolve_tensor_markers(module, composites=True):  # other code under the same name
        return {}

    flatbuffer = artifact_key(tiny_llama, checkpoint, "none", cache.code_digests())
    monkeypatch.setattr(lowering, "resolve_tensor_markers", resolve_tensor_markers)
    assert cache_key(lowering_key(tiny_llama, checkpoint, cache.code_digests(), True, ("prefill_8",))) != cache_key(before)
    assert artifact_key(tiny_llama, checkpoint, "none", cache.code_digests()) == flatbuffer  # not what it reads

    def quiet_progress():  # other code under the same name, read by the lowering a float flatbuffer is made from
        pass

    monkeypatch.setattr(lowering, "quiet_progress", quiet_progress)
    assert cache_key(lowering_key(tiny_llama, checkpoint, cache.code_digests(), True, ("prefill_8",))["modules"]) != (
        cache_key(before["modules"]))
    assert artifact_key(tiny_llama, checkpoint, "none", cache.code_digests()) != flatbuffer
    # The builder's loader shapes every artifact: flatbuffer and StableHLO keys both hold it.
    assert "reauthored_loader" in before["modules"]
    assert "reauthored_loader" in artifact_key(tiny_llama, checkpoint, "none", cache.code_digests())


def test_the_stablehlo_stage_from_the_cache_gives_the_records_it_gave_when_it_lowered(tiny_llama, gates, tmp_path):
    """Cold (a miss: exported and lowered, stored, read back) and warm (hits, in a new cache object as a new process
    has) give the same logits to the bit and the same records; the second run exports and lowers nothing."""
    from harness.lowering import STABLEHLO_KIND
    from harness.programs import PROGRAMS_KIND

    runs = []
    for _ in range(2):
        cache = ArtifactCache(tmp_path / "cache")
        options = RunOptions(RunConfig(stages=(stages.STABLEHLO,)), gates, cache)
        report = verify_pair(tiny_llama, options)
        runs.append((report, {kind: ([n for n in cache.hits if n.startswith(kind)],
                                     [n for n in cache.misses if n.startswith(kind)])
                              for kind in (PROGRAMS_KIND, STABLEHLO_KIND)}))
    (cold, cold_entries), (warm, warm_entries) = runs
    for kind, stage in ((PROGRAMS_KIND, stages.EXPORTED), (STABLEHLO_KIND, stages.STABLEHLO)):
        (cold_hits, cold_misses), (warm_hits, warm_misses) = cold_entries[kind], warm_entries[kind]
        assert len(cold_misses) == 1 and not cold_hits and warm_hits == cold_misses and not warm_misses, kind
        for a, b in zip(cold.state.logits[stage], warm.state.logits[stage], strict=True):
            assert np.array_equal(a, b)
        assert warm.notes["artifacts"][stage]["key"] == cold_misses[0]
    assert [(r.stage, r.check, r.status, r.metrics) for r in cold.results] == [
        (r.stage, r.check, r.status, r.metrics) for r in warm.results]


XLA_STEPS = """
import json, sys
from pathlib import Path
from tensorflow.python.eager import context
from harness import lowering, records, stages
from harness.cache import ArtifactCache
from harness.config import RunConfig
from harness.gates import load_gates
from harness.lowering import (XLA_KIND, StableHLORunner, compiled_executables, process_xla_directory,
                              share_weights, stage_lowering)
from harness.pairs import discover
from harness.pipeline import RunOptions, verify_pair

pair, steps, host_flags = discover()["tiny_llama"], [], records.cpu_flags
with ArtifactCache(Path(sys.argv[1]), shared=False, borrow=("checkpoint", "exported", "stablehlo")) as cache:
    # First, as this process's first TensorFlow work: the stage itself with the real model's lowering (weights
    # as arguments, whose variables start TensorFlow before any call).
    fits_inline, lowering.fits_inline = lowering.fits_inline, lambda model: False
    report = verify_pair(pair, RunOptions(RunConfig(stages=(stages.STABLEHLO,)), load_gates(), cache))
    lowering.fits_inline, state = fits_inline, report.state
    misses = [n for n in cache.misses if n.startswith(XLA_KIND)]
    arguments = {"misses": misses, "executables": [len(list((cache.store / n).glob("*.pb"))) for n in misses],
                 "stablehlo": sorted({r.status for r in report.results if r.stage == stages.STABLEHLO})}
    prompt = state.trajectories[0].tokens[:8]
    for step in ("cold", "warm", "other cpu", "damaged", "rebuilt"):
        records.cpu_flags = (lambda: ["avx512f", "avx512_vnni"]) if step == "other cpu" else host_flags
        if step == "damaged" and steps[0]["misses"]:  # one executable of the cold step's entry cut short
            executable = next((cache.store / steps[0]["misses"][0]).glob("*.pb"))
            executable.write_bytes(executable.read_bytes()[:1000])
        context._reset_context()  # TensorFlow forgets what it compiled in memory, as a new process has
        before = {name: len(getattr(cache, name)) for name in ("hits", "misses", "rebuilt")}
        entry, (lowered, _, _) = stage_lowering(cache, pair, state.checkpoint, state.model, state.programs,
                                                ("prefill_8",))
        share_weights(lowered.values())
        with compiled_executables(cache, entry):
            runner = StableHLORunner(lowered, pair.export.prefill_lens, pair.export.kv_cache_max)
            logits, kv = runner.prefill(prompt, runner.empty_kv())
            step_logits, _ = runner.decode(int(prompt[-1]), len(prompt), kv)
        steps.append({**{name: [n for n in getattr(cache, name)[start:] if n.startswith(XLA_KIND)]
                         for name, start in before.items()},
                      "directory": sorted(p.name for p in process_xla_directory().iterdir()),
                      "logits": [logits.tobytes().hex(), step_logits.tobytes().hex()]})
    entry = sorted(p.name for p in (cache.store / steps[0]["misses"][0]).glob("*.pb")) if steps[0]["misses"] else []
print("STEPS", json.dumps({"steps": steps, "entry": entry, "arguments": arguments}))
"""


def test_xla_executables_load_from_the_cache_per_cpu_and_a_damaged_one_is_compiled_again(options):
    """The stablehlo stage's XLA executables, in a process of their own (TensorFlow reads its XLA flags once, and
    keeps what it compiled in memory; the script resets that between steps, as a new process starts). First, the
    stage with weights as arguments (the real model's) publishes its executables. Then a miss compiles and
    publishes; a hit is served, and TensorFlow's directory holds only its executables; another CPU's flags name
    another entry (XLA compiles for the host's instructions); a damaged entry is never handed to TensorFlow:
    compiled and published again. The same logits to the bit in every step; a private cache publishes nothing."""
    from harness.lowering import XLA_KIND

    shared = options.cache.root / XLA_KIND
    shared_before = sorted(shared.iterdir()) if shared.exists() else []
    proc = subprocess.run([sys.executable, "-c", XLA_STEPS, str(options.cache.root)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("STEPS "))[len("STEPS "):])
    (cold, warm, other, damaged, rebuilt), entry = found["steps"], found["entry"]
    # weights as arguments (the real model): its three signatures compiled and published, the stage passing
    assert found["arguments"]["executables"] == [3] and found["arguments"]["stablehlo"] == ["pass"]
    assert found["arguments"]["misses"] != cold["misses"]
    assert len(cold["misses"]) == 1 and not cold["hits"] and len(entry) == 2  # prefill_8, decode
    assert warm["hits"] == cold["misses"] and not warm["misses"] and warm["directory"] == entry
    assert not other["hits"] and len(other["misses"]) == 1 and other["misses"] != cold["misses"]
    assert damaged["rebuilt"] == damaged["misses"] == cold["misses"] and not damaged["hits"]
    assert rebuilt["hits"] == cold["misses"] and not rebuilt["misses"]
    assert all(step["logits"] == cold["logits"] for step in found["steps"])
    # nothing the private run built reached the shared cache (the other test worker may publish its own entries)
    built = {name.split("/")[-1] for step in found["steps"] for name in step["misses"] + step["rebuilt"]}
    built |= {name.split("/")[-1] for name in found["arguments"]["misses"]}
    published = {p.name for p in shared.iterdir()} - {p.name for p in shared_before} if shared.exists() else set()
    assert built and not {name.removesuffix(".lock") for name in published} & built, published & built


def _build_once_slowly(root, log, result):
    """One process's get_or_build of a shared key, its build slow enough for the other to arrive meanwhile."""
    import time

    def build(out):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        (out / "artifact.bin").write_text("built once")

    cache = ArtifactCache(root)
    entry = cache.get_or_build("tflite", {"k": "shared"}, build)
    Path(result).write_text(json.dumps({"hits": len(cache.hits), "misses": len(cache.misses),
                                        "text": (entry / "artifact.bin").read_text()}))


def test_processes_sharing_the_cache_build_an_entry_once(tmp_path):
    """Two processes miss the same key at once (pairs side by side, tests beside a verify): one builds, the
    other waits on the entry's lock and is served what it built; neither removes the entry under the other."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = [tmp_path / f"result{i}.json" for i in range(2)]
    procs = [context.Process(target=_build_once_slowly, args=(tmp_path / "cache", tmp_path / "builds.log", r))
             for r in results]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    seen = [json.loads(r.read_text()) for r in results]
    assert sorted((s["hits"], s["misses"]) for s in seen) == [(0, 1), (1, 0)]
    assert {s["text"] for s in seen} == {"built once"}


def test_hfs_reference_from_the_cache_is_what_hf_computes_here_and_its_key_holds_the_cpu_and_threads(
        tiny_llama, gates, tmp_path, monkeypatch):
    """Cold (computed, stored, read back) and warm (a hit, in a new cache object) give the hf stage the same
    trajectories, logits and records, and those are what HF computes in this process; the reference of another
    thread count, CPU or prompt is another entry."""
    import torch

    from harness import reference, workload

    runs = []
    for _ in range(2):
        cache = ArtifactCache(tmp_path / "cache")
        report = verify_pair(tiny_llama, RunOptions(RunConfig(stages=(stages.HF,)), gates, cache))
        runs.append((report, [n for n in cache.misses if n.startswith(reference.REFERENCE_KIND)],
                     [n for n in cache.hits if n.startswith(reference.REFERENCE_KIND)]))
    (cold, cold_misses, cold_hits), (warm, warm_misses, warm_hits) = runs
    assert len(cold_misses) == 1 and not cold_hits and warm_hits == cold_misses and not warm_misses
    assert warm.notes["artifacts"][stages.HF]["key"] == cold_misses[0]
    served = tmp_path / "cache" / cold_misses[0] / reference.REFERENCE_FILE  # named by its file, as a flatbuffer is
    assert warm.notes["artifacts"][stages.HF]["sha256"] == file_digest(served)
    assert [(r.check, r.status, r.metrics) for r in cold.results] == [(r.check, r.status, r.metrics)
                                                                      for r in warm.results]
    fresh = reference.run_reference(tiny_llama, warm.state.checkpoint)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.logits, warm.state.logits[stages.HF], strict=True))
    assert [(t.prompt_len, t.tokens.tolist()) for t in fresh.trajectories] == [
        (t.prompt_len, t.tokens.tolist()) for t in warm.state.trajectories]

    key = reference.reference_key(tiny_llama, warm.state.checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert reference.reference_key(tiny_llama, warm.state.checkpoint) != key
    finally:
        torch.set_num_threads(threads)
    # Another host's capability than this one's (an AVX-512 host reports "AVX512", an AVX2-only one "AVX2").
    other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    assert reference.reference_key(tiny_llama, warm.state.checkpoint) != key
    monkeypatch.undo()
    prompts = workload.make_prompts(tiny_llama)
    monkeypatch.setattr(reference, "make_prompts", lambda pair: [prompts[0][::-1], *prompts[1:]])
    assert reference.reference_key(tiny_llama, warm.state.checkpoint)["prompts"] != key["prompts"]


def test_a_checkpoints_digest_is_remembered_until_a_weight_file_is_written(tmp_path):
    """dir_digest is asked for a real model's 1 GB of weights by several keys a run: it hashes them once, and again
    after a file is rewritten in place with as many bytes or replaced."""
    import time

    from harness.cache import dir_digest

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 100)
    first = dir_digest(tmp_path)
    assert dir_digest(tmp_path) == first
    time.sleep(0.02)  # past the file system's coarsest clock tick
    weights.write_bytes(b"a" * 99 + b"b")
    second = dir_digest(tmp_path)
    assert second != first
    replacement = tmp_path / "new"
    replacement.write_bytes(b"a" * 100)
    os.replace(replacement, weights)
    assert dir_digest(tmp_path) == first != second
