"""Shared, expensive fixtures: the tiny pair verified and benched once per session, its golden recorded once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: torch's default of a thread per core each oversubscribes them (measured: the
    # suite took 681 s that way, 341-401 s with one thread per worker). Set before torch is imported, and inherited by
    # the harness processes the tests start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from harness import bench, golden, stages
from harness.lowering import process_xla_directory
from harness.cache import ArtifactCache
from harness.config import RunConfig, default_cache_dir
from harness.gates import load_gates
from harness.pairs import discover
from harness.pipeline import RunOptions, verify_pair

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow reads its XLA flags at its first compile: the directory the stablehlo stage hands XLA's cached
# executables to is set before any test compiles, as a harness child has it set before its stablehlo stage.
process_xla_directory()


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run real-model tests (minutes, GiBs)")


# Test files that share an expensive session fixture go to one worker together: apart, each worker builds it.
FILES_SHARING_A_FIXTURE = {
    # the session's verify of every pair (pair_report): ~10 s a pair, both files paying it apart (2026-12-05)
    "pair reports": ("test_models.py", "test_properties.py", "test_golden_compare.py"),
    # one small bench of tiny_llama (perf): 14.5 and 15.5 s, once in each file apart (2026-12-06)
    "perf": ("test_bench_run.py", "test_bench_report.py"),
}
_UNIT_OF_FILE = {file: unit for unit, files in FILES_SHARING_A_FIXTURE.items() for file in files}


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (nox -s tests), with each group of FILES_SHARING_A_FIXTURE one unit. (pytest-xdist's own
    `loadgroup` does not group under pytest 9: the group it appends to a test's id no longer takes.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FixtureSharersTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return _UNIT_OF_FILE.get(Path(file).name, file)

    return FixtureSharersTogether(config, log)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="real-model test: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pairs():
    return discover()


@pytest.fixture(scope="session")
def cache():
    """The shared artifact cache (EDGE_PARITY_CACHE or ~/.cache/edge-parity): keys make sharing safe."""
    return ArtifactCache(Path(default_cache_dir()))


@pytest.fixture(scope="session")
def gates():
    return load_gates()


@pytest.fixture(scope="session")
def options(gates, cache):
    return RunOptions(RunConfig(), gates, cache)


def _privately(options, borrow: tuple[str, ...]):
    with ArtifactCache(options.cache.root, shared=False, borrow=borrow) as cache:
        yield options.derive(cache=cache)


@pytest.fixture
def private(options):
    """The run options with a private cache, for a test that patches the lowering: what the patch builds must
    neither be served the shared cache's clean artifact nor be published. The checkpoint, HF's reference run and the
    exported programs, which the patch cannot shape, are borrowed from the shared cache."""
    yield from _privately(options, ("checkpoint", "reference", "exported"))


@pytest.fixture
def private_conversion(options):
    """As `private`, for a test that patches the converter's last step or a recipe: the lowered modules a float
    flatbuffer is made from are borrowed too, as no such patch shapes them."""
    yield from _privately(options, ("checkpoint", "reference", "exported", "lowered"))


@pytest.fixture(scope="session")
def tiny_llama(pairs):
    return pairs["tiny_llama"]


@pytest.fixture(scope="session")
def pair_report(pairs, options):
    """A pair through every stage, its default recipes and the property checks, run on first use and
    kept for the session: `pair_report(name)` -> PairReport (with the runners of every stage)."""

    from harness.properties import property_checks

    reports = {}

    def run(name: str):
        if name not in reports:
            reports[name] = verify_pair(pairs[name], options.derive(extra_checks=(property_checks,)))
        return reports[name]

    return run


@pytest.fixture(scope="session")
def property_runs(pair_report):
    return pair_report


@pytest.fixture(scope="session")
def tiny_llama_report(pair_report):
    """tiny_llama through every stage with the default recipes, once per session."""
    return pair_report("tiny_llama")


@pytest.fixture(scope="session")
def bench_settings(cache):
    """Bench settings short enough for a test: one thread, a few steps, three gate rounds, no engine
    (tests/test_bench_engine.py measures the bundle)."""
    return bench.BenchSettings(threads=(1,), decode_steps=16, warmup=2, prefill_repeats=2, rounds=3,
                               cache_dir=str(cache.root), engine=False)


@pytest.fixture(scope="session")
def bench_artifacts(tiny_llama, cache):
    """tiny_llama's float and default-recipe flatbuffers, from the cache or converted once."""
    return bench.resolve_artifacts([tiny_llama], None, cache, echo=lambda line: None)


@pytest.fixture(scope="session")
def perf(tiny_llama, cache, gates, bench_settings, tmp_path_factory):
    """One small bench of tiny_llama (float and int8, one thread, PyTorch included), saved as a baseline too."""
    out = tmp_path_factory.mktemp("perf")
    document = bench.run_bench([tiny_llama], None, cache, bench_settings, gates, out, save_dir=out / "baseline",
                               echo=lambda line: None)
    return out, document


@pytest.fixture(scope="session")
def golden_date():
    """The date every golden recorded by the tests carries, so a re-recording compares byte for byte."""
    return "2026-01-01"


@pytest.fixture(scope="session")
def recorded(tiny_llama, tiny_llama_report, gates, golden_date, tmp_path_factory):
    """tiny_llama's golden recorded from the session's clean run, in a directory of its own."""
    directory = tmp_path_factory.mktemp("golden")
    outcome = golden.update(tiny_llama, tiny_llama_report.state.logits, tiny_llama_report.state.trajectories,
                            tiny_llama_report.results, gates, directory,
                            today=golden_date)
    assert outcome.status == "recorded", outcome.diff
    return directory


@pytest.fixture(scope="session")
def rope_report(tiny_llama, gates, cache, recorded):
    """tiny_llama with a RoPE base 50% too large, same name: the golden check runs inside the pipeline."""
    from tests import variants

    pair = dataclasses.replace(tiny_llama, reauthored=variants.wrong_rope_base)
    options = RunOptions(RunConfig(stages=(stages.REAUTHORED,)), gates, cache, (golden.GoldenCheck(recorded),))
    return pair, verify_pair(pair, options)
