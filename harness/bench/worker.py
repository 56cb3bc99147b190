"""One measurement in a fresh process (a `bench_<kind>` job of harness.child).

A job is a small JSON dict; its kind picks a measure_* function. Each runs alone in its
process so that one artifact's packed weights, allocator state or warm caches never
flatter or burden the next one.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import child
from harness.bench.stats import summarize
from harness.memory import current_rss_mb, peak_rss_mb

TOKEN = 3  # any id inside every vocabulary


def _timed(call, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


class CompiledRunner:
    """The flatbuffer in LiteRT's CompiledModel with buffers created once and reused.

    Decode ping-pongs two sets of KV buffers (step t writes the set step t+1 reads), so no KV
    byte crosses into Python: this is the runtime with the least overhead its Python API allows.
    """

    def __init__(self, path: str, threads: int):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=threads))
        self.model = CompiledModel.from_file(str(path), options=options)
        self.inputs, self.outputs = {}, {}
        for sig in self.model.get_signature_list():
            self.inputs[sig] = {n: self.model.create_input_buffer_by_name(sig, n)
                                for n in self.model.get_input_tensor_details(sig)}
            self.outputs[sig] = {n: self.model.create_output_buffer_by_name(sig, n)
                                 for n in self.model.get_output_tensor_details(sig)}
        self.kv_names = [n for n in self.inputs["decode"] if n.startswith("kv_cache_")]
        details = self.model.get_input_tensor_details("decode")
        self.kv_max = int(details[self.kv_names[0]]["shape"][1])
        for sig, buffers in self.inputs.items():  # every cache starts empty
            for k in self.kv_names:
                buffers[k].write(np.zeros(details[k]["shape"], np.dtype(details[k]["dtype"])))

    def prefill(self, length: int) -> None:
        """Prefills an empty cache; the filled cache lands in the buffers decode reads first."""
        sig = f"prefill_{length}"
        self.inputs[sig]["tokens"].write(np.full((1, length), TOKEN, np.int32))
        self.inputs[sig]["input_pos"].write(np.arange(length, dtype=np.int32))
        outputs = {"logits": self.outputs[sig]["logits"], **{k: self.inputs["decode"][k] for k in self.kv_names}}
        self.model.run_by_name(sig, self.inputs[sig], outputs)

    def decode_loop(self, start: int):
        """A step function decoding at positions start, start+1, ... (wrapping inside the cache).

        The maps of both ping-pong phases are built once; a step writes only the position.
        """
        ins, outs = self.inputs["decode"], self.outputs["decode"]
        ins["tokens"].write(np.array([[TOKEN]], np.int32))
        first = {k: ins[k] for k in self.kv_names}
        second = {k: outs[k] for k in self.kv_names}
        phases = [({"tokens": ins["tokens"], "input_pos": ins["input_pos"], **a}, {"logits": outs["logits"], **b})
                  for a, b in ((first, second), (second, first))]
        position = np.array([start], np.int32)
        state = {"phase": 0}

        def step():
            ins["input_pos"].write(position)
            self.model.run_by_name("decode", *phases[state["phase"]])
            state["phase"] ^= 1
            position[0] = start + (position[0] + 1 - start) % (self.kv_max - start)

        return step


def measure_tflite(job: dict, channel=None) -> dict:
    """Creation, first run, peak RSS, prefill and decode latency of the runtime, then the binding's overhead."""
    path, threads = job["path"], job["threads"]
    prefill_lens = sorted(job["prefill_lens"])
    importlib.import_module("ai_edge_litert.compiled_model")  # the runtime's own footprint is not the model's

    rss_before = current_rss_mb()
    start = time.perf_counter()
    runner = CompiledRunner(path, threads)
    create_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    runner.prefill(prefill_lens[0])
    first_prefill_ms = (time.perf_counter() - start) * 1e3
    step = runner.decode_loop(prefill_lens[0])
    start = time.perf_counter()
    step()
    first_decode_ms = (time.perf_counter() - start) * 1e3
    prefill = {}
    for length in prefill_lens:
        stats = summarize(_timed(lambda n=length, prefill=runner.prefill: prefill(n), job["prefill_repeats"], 2))
        prefill[str(length)] = {**stats, "tokens_per_s": length / stats["median_ms"] * 1e3}
    decode = summarize(_timed(step, job["decode_steps"], job["warmup"]))
    decode["tokens_per_s"] = 1e3 / decode["median_ms"]
    result = {
        "size_bytes": os.path.getsize(path), "create_ms": create_ms, "first_prefill_ms": first_prefill_ms,
        "first_decode_ms": first_decode_ms, "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
        "prefill": prefill, "decode": decode, "kv_cache_bytes": kv_bytes(runner),
    }
    kv_max = runner.kv_max
    del runner
    result["binding"] = measure_binding(job, kv_max)
    return result


def kv_bytes(runner: CompiledRunner) -> int:
    details = runner.model.get_input_tensor_details("decode")
    return int(sum(np.prod(details[k]["shape"]) * np.dtype(details[k]["dtype"]).itemsize for k in runner.kv_names))


def measure_binding(job: dict, kv_cache_max: int) -> dict:
    """The same calls through harness.runners.TFLiteRunner, the runner the parity stages use.

    Each call writes every input, the KV caches included, from numpy and reads every output back; the
    difference from the CompiledModel figures above is the host overhead of that binding.
    """
    from harness.runners import TFLiteRunner

    prefill_lens = sorted(job["prefill_lens"])
    start = time.perf_counter()
    runner = TFLiteRunner(job["path"], prefill_lens, kv_cache_max, job["threads"])
    create_ms = (time.perf_counter() - start) * 1e3
    empty = runner.empty_kv()

    prefill = {}
    for n in prefill_lens:
        tokens, positions = np.full((1, n), TOKEN, np.int32), np.arange(n, dtype=np.int32)
        prefill[str(n)] = summarize(_timed(lambda t=tokens, p=positions, n=n: runner.call(f"prefill_{n}", t, p, empty),
                                           job["prefill_repeats"], 2))
    first = prefill_lens[0]
    _, kv = runner.call(f"prefill_{first}", np.full((1, first), TOKEN, np.int32), np.arange(first, dtype=np.int32),
                        empty)
    state = {"pos": first, "kv": kv}

    def step():
        _, state["kv"] = runner.call("decode", np.array([[TOKEN]], np.int32), np.array([state["pos"]], np.int32),
                                     state["kv"])
        state["pos"] = first + (state["pos"] + 1 - first) % (runner.kv_cache_max - first)

    decode = summarize(_timed(step, job["decode_steps"], job["warmup"]))
    return {"create_ms": create_ms, "prefill": prefill, "decode": decode}


def measure_engine(job: dict, channel=None) -> dict:
    """The bundle in the LiteRT-LM engine, timed by the engine's own benchmark mode: `repeats` runs of a fresh
    engine and session (after one that fills its XNNPack cache), each prefilling `prefill_tokens` and decoding
    `decode_tokens`; medians over the runs, and this process's peak RSS.

    The engine's log (stderr) goes to job["log"], where the parent finds the reason of a failure.
    """
    with open(job["log"], "ab") as log:  # the engine's own error lines never reach Python's exception
        os.dup2(log.fileno(), 2)
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.WARNING)  # loads the engine's library: not the model's RSS
    rss_before = current_rss_mb()
    backend = litert_lm.Backend.CPU(thread_count=job["threads"])
    # Not beside the cached bundle; in the job's scratch, which the parent removes even if this child is killed.
    with tempfile.TemporaryDirectory(prefix="litertlm-cache-", dir=child.scratch()) as cache_dir:
        def run():
            return litert_lm.Benchmark(job["path"], backend, prefill_tokens=job["prefill_tokens"],
                                       decode_tokens=job["decode_tokens"], cache_dir=cache_dir,
                                       activation_data_type=litert_lm.ActivationDataType.FLOAT32).run()

        first = run()
        runs = [run() for _ in range(job["repeats"])]
    return {
        "size_bytes": os.path.getsize(job["path"]), "first_init_ms": first.init_time_in_second * 1e3,
        "init_ms": float(np.median([r.init_time_in_second * 1e3 for r in runs])),
        "ttft": summarize([r.time_to_first_token_in_second for r in runs]),
        "prefill": {"tokens": runs[0].last_prefill_token_count,
                    "tokens_per_s": float(np.median([r.last_prefill_tokens_per_second for r in runs]))},
        "decode": {"tokens": runs[0].last_decode_token_count,
                   "tokens_per_s": float(np.median([r.last_decode_tokens_per_second for r in runs]))},
        "repeats": len(runs), "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
    }


def measure_quick(job: dict, channel=None) -> dict:
    """What the gate compares: decode and largest-prefill tokens/s of the runtime, nothing else."""
    runner = CompiledRunner(job["path"], job["threads"])
    length = max(job["prefill_lens"])
    prefill = summarize(_timed(lambda: runner.prefill(length), job["prefill_repeats"], 2))
    step = runner.decode_loop(min(job["prefill_lens"]))
    decode = summarize(_timed(step, job["decode_steps"], job["warmup"]))
    return {"decode_tokens_per_s": 1e3 / decode["median_ms"],
            "prefill_tokens_per_s": length / prefill["median_ms"] * 1e3}


def measure_reauthored(job: dict, channel=None) -> dict:
    """The re-authored PyTorch model on the same prompts and threads, for context."""
    import torch

    from harness.cache import ArtifactCache
    from harness.checkpoint import build_reauthored, reference_checkpoint
    from harness.pairs import discover
    from harness.runners import ReauthoredRunner

    torch.set_num_threads(job["threads"])
    pair = discover(tuple(Path(d) for d in job["models_dirs"]))[job["model"]]
    checkpoint = reference_checkpoint(pair, ArtifactCache(Path(job["cache_dir"])))
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    runner = ReauthoredRunner(model, pair.export.kv_cache_max)
    prefill = {}
    for length in sorted(job["prefill_lens"]):
        tokens = np.full(length, TOKEN, np.int64)
        stats = summarize(_timed(lambda t=tokens: runner.prefill(t, runner.empty_kv()), job["prefill_repeats"], 1))
        prefill[str(length)] = {**stats, "tokens_per_s": length / stats["median_ms"] * 1e3}
    start = min(job["prefill_lens"])
    _, kv = runner.prefill(np.full(start, TOKEN, np.int64), runner.empty_kv())
    state = {"pos": start, "kv": kv}
    limit = pair.export.kv_cache_max

    def step():
        _, state["kv"] = runner.decode(TOKEN, state["pos"], state["kv"])
        state["pos"] = start + (state["pos"] + 1 - start) % (limit - start)

    decode = summarize(_timed(step, job["decode_steps"], job["warmup"]))
    decode["tokens_per_s"] = 1e3 / decode["median_ms"]
    return {"prefill": prefill, "decode": decode}


def measure_bandwidth(job: dict, channel=None) -> dict:
    """Memory bandwidth of this machine: best of a few copies of an array far larger than any cache.

    Counted STREAM-style as bytes read plus bytes written per copy, on one thread (numpy's copy).
    """
    size = int(job.get("bytes", 256 * 2**20))
    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    best_copy = min(_timed(lambda: np.copyto(dst, src), job.get("repeats", 7), 1))
    best_read = min(_timed(lambda: src.sum(), job.get("repeats", 7), 1))
    return {"array_bytes": size, "copy_gbs": 2 * size / best_copy / 1e9, "read_gbs": size / best_read / 1e9}


def measure_delegation(job: dict, channel=None) -> dict:
    from harness.bench.delegation import delegation

    return delegation(Path(job["path"]), job.get("threads", 1))
