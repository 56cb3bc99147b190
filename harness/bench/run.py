"""The bench's parent side: which artifacts, which jobs in what order, the records, and the baseline gate.

Every measurement runs in a fresh process (harness.bench.worker); this module picks the
artifacts, runs the jobs one after another, and assembles the records that perf.json holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from harness import stages
from harness.bench import stats
from harness.bench.delegation import decode_weight_bytes
from harness.cache import ArtifactCache, file_digest
from harness.convert import FLOAT, cached_artifact, convert
from harness.errors import HarnessError
from harness.gates import Gates
from harness.pairs import ModelPair
from harness.paths import display_path
from harness.records import FAIL, PASS, host_info, library_versions, run_metadata

BENCH = stages.BENCH  # the gates table: [defaults.bench.<metric>] max_slowdown
GATED_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s")
BASELINE_MANIFEST = "baseline.json"
SCHEMA_VERSION = 1

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One converted flatbuffer to measure."""

    model: str
    recipe: str
    path: Path
    prefill_lens: tuple[int, ...]

    @property
    def stage(self) -> str:
        """The parity stage this flatbuffer is, e.g. tflite_float or tflite_dynamic_int8."""
        return stages.TFLITE_FLOAT if self.recipe == FLOAT else stages.tflite_stage(self.recipe)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.stage}"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """One .litertlm bundle to measure in the LiteRT-LM engine: the float flatbuffer (transposed KV layout) with
    the pair's tokenizer, as the litertlm stage builds it. It prefills as many tokens as the largest prefill
    signature, the interpreter's figure it is compared with."""

    model: str
    path: Path
    prefill_tokens: int
    context_length: int
    stage = stages.LITERTLM

    @property
    def label(self) -> str:
        return f"{self.model}/{self.stage}"


@dataclasses.dataclass
class BenchSettings:
    """How long each measurement runs; the defaults keep a tiny model's bench to a few minutes."""

    threads: tuple[int, ...] = (1, 2)
    decode_steps: int = 256
    warmup: int = 16
    prefill_repeats: int = 10
    rounds: int = 8  # candidate/baseline pairs of runs per gate comparison
    cache_dir: str = ""
    models_dirs: tuple[str, ...] = ()
    pytorch: bool = True
    engine: bool = True  # the float bundle in the LiteRT-LM engine, beside the float flatbuffer
    engine_repeats: int = 5  # engine runs (fresh engine, prefill, decode) per thread count, after a cold one

    def job(self, kind: str, **fields) -> dict:
        return {"kind": kind, "decode_steps": self.decode_steps, "warmup": self.warmup,
                "prefill_repeats": self.prefill_repeats, **fields}

    def engine_job(self, bundle: Bundle, threads: int) -> dict:
        """Decode as many steps as the interpreter does, or as the context leaves after the prefill."""
        return {"kind": "engine", "path": str(bundle.path), "threads": threads, "repeats": self.engine_repeats,
                "prefill_tokens": bundle.prefill_tokens,
                "decode_tokens": min(self.decode_steps, bundle.context_length - bundle.prefill_tokens)}


def flatbuffer(pair: ModelPair, checkpoint: Path, recipe: str, cache: ArtifactCache, models: dict, echo: Echo,
               kv_layout: str = "default") -> Path:
    """A pair's flatbuffer from the cache, converted on a miss from the re-authored model (built once, in `models`)."""
    from harness.checkpoint import build_reauthored

    path = cached_artifact(pair, checkpoint, recipe, cache, kv_layout)
    if path is None:
        echo(f"[{pair.name}] converting {recipe}{'' if kv_layout == 'default' else f' ({kv_layout} KV layout)'} "
             "(not in the cache)")
        if pair.name not in models:
            models[pair.name], _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
        path = convert(pair, models[pair.name], checkpoint, recipe, cache, kv_layout=kv_layout)
    return path


def resolve_artifacts(pairs: list[ModelPair], recipes: tuple[str, ...] | None, cache: ArtifactCache,
                      echo: Echo = print) -> list[Artifact]:
    """The float flatbuffer and each recipe's of every pair: from the cache, converted on a miss."""
    from harness.checkpoint import reference_checkpoint

    artifacts, models = [], {}
    for pair in pairs:
        checkpoint = reference_checkpoint(pair, cache)
        wanted = [FLOAT] + [r for r in (pair.default_quant if recipes is None else recipes)
                            if r in pair.quant_recipes]
        for recipe in wanted:
            path = flatbuffer(pair, checkpoint, recipe, cache, models, echo)
            artifacts.append(Artifact(pair.name, recipe, path, tuple(pair.export.prefill_lens)))
    return artifacts


def resolve_bundles(pairs: list[ModelPair], cache: ArtifactCache, echo: Echo = print) -> list[Bundle]:
    """The float bundle of every pair, built as the litertlm stage builds it (harness.bundle), cached."""
    from harness import bundle
    from harness.checkpoint import reference_checkpoint

    bundles, models = [], {}
    for pair in pairs:
        checkpoint = reference_checkpoint(pair, cache)
        path = flatbuffer(pair, checkpoint, FLOAT, cache, models, echo, kv_layout="transposed")
        with tempfile.TemporaryDirectory() as tmp:
            settings = bundle.hf_settings(pair, checkpoint)
            built = bundle.build_bundle(path, bundle.tokenizer_file(pair, checkpoint, Path(tmp)), settings, cache)
        bundles.append(Bundle(pair.name, built, max(pair.export.prefill_lens), settings.context_length))
    return bundles


def run_job(job: dict, timeout: float = 3600) -> dict:
    """One measurement in a fresh Python process (harness.child); its failure is raised with the end of its output."""
    from harness import child

    try:
        return child.run(f"bench_{job['kind']}", job, timeout=timeout)
    except child.ChildFailed as failure:
        raise RuntimeError(f"bench job {job['kind']} exited with {failure.code}: {failure.output()}") from None


def run_engine_job(job: dict) -> dict:
    """An engine measurement (harness.bench.worker.measure_engine); its failure is raised with the engine's own
    reason from its log (its Python layer says only "failed")."""
    from harness.bundle import engine_reason

    with tempfile.TemporaryDirectory(prefix="edge-parity-engine-") as tmp:
        log = Path(tmp) / "engine.log"
        try:
            return run_job({**job, "log": str(log)})
        except RuntimeError as e:
            reason = engine_reason(log)
            raise RuntimeError(f"the LiteRT-LM engine failed on {display_path(job['path'])}{reason}"
                               if reason else str(e)) from None


def versus_interpreter(engine: dict, interpreter: dict) -> dict:
    """Engine over interpreter, at the engine's prefill length: against the runtime (CompiledModel, buffers
    reused) and against the runner the parity stages use (every KV cache copied per call). The
    interpreter's time to first token is its prefill's median latency."""
    n = str(engine["prefill"]["tokens"])
    if n not in interpreter["prefill"]:
        return {}
    prefill_tps, decode_tps = engine["prefill"]["tokens_per_s"], engine["decode"]["tokens_per_s"]
    compiled, binding = interpreter, interpreter["binding"]
    return {
        "prefill_tokens": int(n),
        "compiled": {"prefill_tokens_per_s": prefill_tps / compiled["prefill"][n]["tokens_per_s"],
                     "decode_tokens_per_s": decode_tps / compiled["decode"]["tokens_per_s"],
                     "ttft": engine["ttft"]["median_ms"] / compiled["prefill"][n]["median_ms"],
                     "peak_rss": engine["peak_rss_mb"] / compiled["peak_rss_mb"]},
        "parity_runner": {"prefill_tokens_per_s": prefill_tps * binding["prefill"][n]["median_ms"] / 1e3 / int(n),
                             "decode_tokens_per_s": decode_tps * binding["decode"]["median_ms"] / 1e3,
                             "ttft": engine["ttft"]["median_ms"] / binding["prefill"][n]["median_ms"]},
    }


def derived(record: dict, bandwidth_gbs: float, weight_bytes: int, pytorch: dict | None) -> dict:
    """Overhead of the binding, efficiency against the memory bandwidth, and the ratio to PyTorch."""
    decode_ms = record["decode"]["median_ms"]
    binding = record["binding"]
    overhead = {
        "decode_ms": binding["decode"]["median_ms"] - decode_ms,
        "decode_pct": 100.0 * (binding["decode"]["median_ms"] / decode_ms - 1.0),
        "prefill_ms": {n: binding["prefill"][n]["median_ms"] - p["median_ms"] for n, p in record["prefill"].items()},
    }
    bytes_per_token = weight_bytes + record["kv_cache_bytes"]
    achieved = bytes_per_token / (decode_ms / 1e3) / 1e9
    efficiency = {"weight_bytes": weight_bytes, "kv_cache_bytes": record["kv_cache_bytes"],
                  "bytes_per_token": bytes_per_token, "achieved_gbs": achieved, "bandwidth_gbs": bandwidth_gbs,
                  "percent": 100.0 * achieved / bandwidth_gbs}
    versus = None
    if pytorch:
        versus = {"decode_speedup": record["decode"]["tokens_per_s"] / pytorch["decode"]["tokens_per_s"],
                  "prefill_speedup": {n: p["tokens_per_s"] / pytorch["prefill"][n]["tokens_per_s"]
                                      for n, p in record["prefill"].items() if n in pytorch["prefill"]}}
    return {"overhead": overhead, "efficiency": efficiency, "vs_pytorch": versus}


def measure(artifacts: list[Artifact], settings: BenchSettings, echo: Echo = print,
            bundles: tuple[Bundle, ...] = ()) -> dict:
    """Every artifact at every thread count, each in its own process; PyTorch once per model and thread count;
    each bundle in the engine after its model's flatbuffers, at the same thread count, so they share the noise."""
    echo("[bench] memory bandwidth")
    bandwidth = run_job({"kind": "bandwidth"})
    described, measurements, pytorch, engine = [], [], [], []
    for artifact in artifacts:
        echo(f"[{artifact.label}] XNNPack delegation")
        entry = {"model": artifact.model, "stage": artifact.stage, "recipe": artifact.recipe,
                 "path": display_path(artifact.path), "size_bytes": artifact.path.stat().st_size,
                 "sha256": file_digest(artifact.path),
                 "decode_weight_bytes": decode_weight_bytes(artifact.path)}
        try:
            entry["delegation"] = run_job({"kind": "delegation", "path": str(artifact.path)})
        except RuntimeError as e:
            entry["delegation"] = {"error": str(e)}
        described.append(entry)
    models = list(dict.fromkeys(a.model for a in artifacts)) if settings.pytorch else []
    for threads in settings.threads:
        for model in models:
            echo(f"[{model}/pytorch] {threads} thread(s)")
            lens = next(a.prefill_lens for a in artifacts if a.model == model)
            job = settings.job("reauthored", model=model, threads=threads, prefill_lens=list(lens),
                               cache_dir=settings.cache_dir, models_dirs=list(settings.models_dirs))
            try:
                pytorch.append({"model": model, "threads": threads, **run_job(job)})
            except RuntimeError as e:  # context only: its failure must not lose the artifacts' figures
                pytorch.append({"model": model, "threads": threads, "error": str(e)})
        for artifact, entry in zip(artifacts, described):
            echo(f"[{artifact.label}] {threads} thread(s)")
            job = settings.job("tflite", path=str(artifact.path), threads=threads,
                               prefill_lens=list(artifact.prefill_lens))
            record = {"model": artifact.model, "stage": artifact.stage, "recipe": artifact.recipe, "threads": threads,
                      **run_job(job)}
            torch_record = next((p for p in pytorch if p["model"] == artifact.model and p["threads"] == threads
                                 and "error" not in p), None)
            record.update(derived(record, bandwidth["copy_gbs"], entry["decode_weight_bytes"], torch_record))
            measurements.append(record)
        for bundle in bundles:
            echo(f"[{bundle.label}] LiteRT-LM engine, {threads} thread(s)")
            record = {"model": bundle.model, "stage": bundle.stage, "recipe": FLOAT, "threads": threads,
                      "path": display_path(bundle.path)}
            try:
                record.update(run_engine_job(settings.engine_job(bundle, threads)))
            except RuntimeError as e:  # the engine's failure must not lose the interpreter's figures
                engine.append({**record, "error": str(e)})
                continue
            interpreter = next((m for m in measurements if m["model"] == bundle.model and m["recipe"] == FLOAT
                                and m["threads"] == threads), None)
            engine.append({**record, "vs_interpreter": versus_interpreter(record, interpreter) if interpreter else {}})
    return {"bandwidth": bandwidth, "artifacts": described, "measurements": measurements, "pytorch": pytorch,
            "engine": engine}


def _baseline_name(artifact: Artifact) -> str:
    return f"{artifact.model}__{artifact.stage}.tflite"


def save_baseline(artifacts: list[Artifact], directory: Path) -> Path:
    """Copies the artifacts into `directory` with a manifest, for a later `bench --baseline`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for a in artifacts:
        shutil.copyfile(a.path, directory / _baseline_name(a))
        entries.append({"model": a.model, "recipe": a.recipe, "file": _baseline_name(a),
                        "prefill_lens": list(a.prefill_lens), "sha256": file_digest(a.path),
                        "source": display_path(a.path)})
    manifest = {"versions": library_versions(), "host": host_info(), "artifacts": entries}
    from harness.report import write_atomic

    write_atomic(directory / BASELINE_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return directory / BASELINE_MANIFEST


def load_baseline(directory: Path) -> dict[tuple[str, str], Artifact]:
    """The artifacts of a directory written by `bench --save-baseline`, by (model, recipe)."""
    manifest = Path(directory) / BASELINE_MANIFEST
    if not manifest.exists():
        raise HarnessError(f"{manifest} does not exist; write a baseline first with "
                           f"`harness bench --save-baseline {directory}` on the reference build")
    data = json.loads(manifest.read_text())
    found = {}
    for e in data["artifacts"]:
        path = Path(directory) / e["file"]
        if not path.exists():
            raise HarnessError(f"baseline manifest {manifest} lists {e['file']}, which is missing; "
                               "re-save the baseline")
        found[(e["model"], e["recipe"])] = Artifact(e["model"], e["recipe"], path, tuple(e["prefill_lens"]))
    return found


def interleaved_samples(candidate: Artifact, baseline: Artifact, threads: int, settings: BenchSettings,
                        echo: Echo | None = None) -> dict[str, dict[str, list[float]]]:
    """Rounds of one candidate run and one baseline run, back to back in alternating order (ABBA)."""
    samples = {m: {"candidate": [], "baseline": []} for m in GATED_METRICS}
    for r in range(settings.rounds):
        order = [("candidate", candidate), ("baseline", baseline)]
        for side, artifact in order if r % 2 == 0 else order[::-1]:
            result = run_job(settings.job("quick", path=str(artifact.path), threads=threads,
                                          prefill_lens=list(artifact.prefill_lens)))
            for m in GATED_METRICS:
                samples[m][side].append(result[m])
        if echo:
            echo(f"[gate] {candidate.label} round {r + 1}/{settings.rounds}: decode "
                 f"{samples['decode_tokens_per_s']['candidate'][-1]:.0f} vs "
                 f"{samples['decode_tokens_per_s']['baseline'][-1]:.0f} tok/s")
    return samples


def gate_against_baseline(candidate: Artifact, baseline: Artifact, threads: int, settings: BenchSettings, gates: Gates,
            echo: Echo | None = None) -> list[dict]:
    """The gate's decision for each gated metric of one candidate against its baseline."""
    samples = interleaved_samples(candidate, baseline, threads, settings, echo)
    decisions = []
    for metric in GATED_METRICS:
        limit = gates.thresholds(candidate.model, BENCH, metric).get("max_slowdown")
        if limit is None:  # a metric not judged is not a pass
            raise HarnessError(f"gates file {gates.path} has no max_slowdown for bench.{metric} of "
                               f"{candidate.model}; add [defaults.bench.{metric}] max_slowdown = ...")
        decision = stats.decide(metric, samples[metric]["candidate"], samples[metric]["baseline"], limit)
        decisions.append({"model": candidate.model, "stage": candidate.stage, "recipe": candidate.recipe,
                          "threads": threads,
                          "candidate": display_path(candidate.path), "baseline": display_path(baseline.path),
                          **decision.to_json(), "samples": samples[metric]})
    return decisions


def compare_all(artifacts: list[Artifact], baseline_dir: Path, threads: int, settings: BenchSettings,
                gates: Gates, echo: Echo = print) -> list[dict]:
    baselines = load_baseline(baseline_dir)
    decisions = []
    for a in artifacts:
        if (a.model, a.recipe) not in baselines:
            echo(f"[gate] {a.label}: no baseline in {baseline_dir}; not gated")
            continue
        decisions += gate_against_baseline(a, baselines[(a.model, a.recipe)], threads, settings, gates, echo)
    return decisions


def self_check(reference: Artifact, slower: Artifact, threads: int, settings: BenchSettings, gates: Gates,
               repeats: int, detections: int, echo: Echo = print) -> dict:
    """False alarms of the gate on the reference against itself, and how often it catches `slower`."""
    def run(candidate: Artifact, n: int, what: str) -> list[dict]:
        out = []
        for i in range(n):
            decisions = gate_against_baseline(candidate, reference, threads, settings, gates)
            out.append({d["metric"]: {k: d[k] for k in ("ratio", "low", "high", "status")} for d in decisions})
            echo(f"[self-check] {what} {i + 1}/{n}: " + ", ".join(
                f"{m} {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}] {v['status']}" for m, v in out[-1].items()))
        return out

    same = run(reference, repeats, f"{reference.label} vs itself")
    caught = run(slower, detections, f"{slower.label} vs {reference.label}")

    def rate(runs: list[dict]) -> dict:
        return {m: sum(r[m]["status"] == FAIL for r in runs) / len(runs) for m in runs[0]} if runs else {}

    return {"reference": reference.label, "slower": slower.label, "threads": threads, "rounds": settings.rounds,
            "self_comparisons": same, "false_alarm_rate": rate(same),
            "slow_comparisons": caught, "detection_rate": rate(caught)}


def perf_document(run: dict, measured: dict | None, comparisons: list[dict], check: dict | None) -> dict:
    """The one record set perf.json holds; perf.md and the plot are rendered from it."""
    failed = any(c["status"] == FAIL for c in comparisons)
    return {"schema_version": SCHEMA_VERSION, "run": run, **(measured or {}),
            "comparisons": comparisons, "self_check": check,
            "verdict": (FAIL if failed else PASS) if comparisons else "not gated"}


def bench_run_metadata(settings: BenchSettings, gates: Gates, baseline: str | None) -> dict:
    return run_metadata(threads=list(settings.threads), gates=gates.path, baseline=baseline,
                        decode_steps=settings.decode_steps, prefill_repeats=settings.prefill_repeats,
                        rounds=settings.rounds, confidence=stats.CONFIDENCE, load_average=list(os.getloadavg()))


def run_bench(pairs: list[ModelPair], recipes: tuple[str, ...] | None, cache: ArtifactCache, settings: BenchSettings,
              gates: Gates, out_dir: Path, baseline_dir: Path | None = None, save_dir: Path | None = None,
              gate_only: bool = False, echo: Echo = print) -> dict:
    """Measure the artifacts, optionally save them as a baseline and gate them against one; writes perf.*."""
    from harness.bench.report import write_perf

    if baseline_dir is not None:
        load_baseline(baseline_dir)  # a missing baseline fails before minutes of converting and measuring
    artifacts = resolve_artifacts(pairs, recipes, cache, echo)
    if save_dir is not None:
        echo(f"[bench] baseline saved: {save_baseline(artifacts, save_dir)}")
    bundles = resolve_bundles(pairs, cache, echo) if settings.engine and not gate_only else []
    measured = None if gate_only else measure(artifacts, settings, echo, tuple(bundles))
    comparisons = compare_all(artifacts, baseline_dir, settings.threads[0], settings, gates, echo) \
        if baseline_dir is not None else []
    document = perf_document(bench_run_metadata(settings, gates, str(baseline_dir) if baseline_dir else None),
                             measured, comparisons, None)
    write_perf(out_dir, document)
    return document


def run_self_check(pair: ModelPair, recipe: str | None, cache: ArtifactCache, settings: BenchSettings, gates: Gates,
                   out_dir: Path, repeats: int, detections: int, slower_pair: ModelPair | None = None,
                   echo: Echo = print) -> dict:
    """The gate's false-alarm rate (an artifact against itself) and how often it catches a slower one.

    The slower candidate is `slower_pair`'s float artifact against `pair`'s (e.g. the pair with
    one more layer), or else whichever of the float artifact and its `recipe` twin decodes
    slower in a pilot comparison, against the other.
    """
    from harness.bench.report import write_perf

    threads = settings.threads[0]
    if slower_pair is not None:
        reference = resolve_artifacts([pair], (), cache, echo)[0]
        slower = resolve_artifacts([slower_pair], (), cache, echo)[0]
    else:
        by_recipe = {a.recipe: a for a in resolve_artifacts([pair], (recipe,), cache, echo)}
        if recipe not in by_recipe:
            raise HarnessError(f"recipe {recipe} does not apply to {pair.name}; "
                               f"pick one of {', '.join(pair.quant_recipes)}")
        float_artifact, twin = by_recipe[FLOAT], by_recipe[recipe]
        pilot = next(d for d in gate_against_baseline(twin, float_artifact, threads, settings, gates)
                     if d["metric"] == GATED_METRICS[0])
        slower, reference = (twin, float_artifact) if pilot["ratio"] < 1 else (float_artifact, twin)
        echo(f"[self-check] pilot: {twin.label}/{float_artifact.label} decode ratio {pilot['ratio']:.3f}; "
             f"{slower.label} is the slower one")
    check = self_check(reference, slower, threads, settings, gates, repeats, detections, echo)
    document = perf_document(bench_run_metadata(settings, gates, None), None, [], check)
    write_perf(out_dir, document)
    return document
