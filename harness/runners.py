"""One runner per stage, all with the prefill/decode interface of the converted model.

A stage's runner supplies `call` (one forward of one signature, unchecked), `empty_kv`, and
`kv_layers`/`kv_from_layers` (its KV container as per-layer numpy (K, V) pairs and back). `Runner`
builds on `call` the two ways every caller goes in: `prefill_at`, which pads to a signature at
any offset, and `decode`; both refuse positions past the cache before anything runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from harness.errors import HarnessError
from harness.workload import Trajectory

if TYPE_CHECKING:  # torch is imported where a PyTorch stage runs: the flatbuffer runner (and the bench) need none
    import torch

KVLayers = list[tuple[np.ndarray, np.ndarray]]  # per layer (K, V) in [batch, slot, heads, head_dim]


def signature_for(prompt_len: int, prefill_lens: tuple[int, ...]) -> int:
    """The smallest prefill signature a prompt fits in (the rest is padding)."""
    fitting = [n for n in sorted(prefill_lens) if n >= prompt_len]
    if not fitting:
        raise HarnessError(
            f"a prompt of {prompt_len} tokens exceeds the largest prefill signature ({max(prefill_lens)}); "
            "shorten the workload's prompts or export a longer prefill length"
        )
    return fitting[0]


def check_positions(start: int, count: int, kv_cache_max: int, doing: str) -> None:
    """A write past the cache would be clamped silently by the runtime: refuse it instead."""
    if start < 0 or start + count > kv_cache_max:
        written = f"position {start}" if count == 1 else f"positions {start}..{start + count - 1}"
        raise HarnessError(
            f"{doing} writes {written}, outside the KV cache "
            f"(kv_cache_max={kv_cache_max}: slots 0..{kv_cache_max - 1}); "
            "start earlier, shorten the sequence or export a larger KV cache"
        )


def teacher_forced(runner, prompt, continuation, kv=None, **prefill_kwargs) -> tuple[np.ndarray, object]:
    """Prefill the prompt, then decode each continuation token in turn: logits at every position, and the cache."""
    kv = runner.empty_kv() if kv is None else kv
    logits, kv = runner.prefill_at(prompt, 0, kv, **prefill_kwargs)
    rows = [logits]
    for i, token in enumerate(continuation):
        step, kv = runner.decode(int(token), len(prompt) + i, kv)
        rows.append(np.asarray(step)[None])
    return np.concatenate(rows), kv


def run_trajectory(runner, trajectory: Trajectory) -> np.ndarray:
    """A stage along an HF trajectory, teacher-forced: logits at every position but the last."""
    tokens, p = trajectory.tokens, trajectory.prompt_len
    check_positions(0, len(tokens) - 1, runner.kv_cache_max, f"a trajectory of {len(tokens)} tokens")
    logits, _ = teacher_forced(runner, tokens[:p], tokens[p:-1])
    return logits.astype(np.float32)


class Runner:
    """Prefill at any offset and decode, on top of a stage's `call(signature, tokens, positions, kv)`.

    A subclass supplies `call`, `empty_kv`, `kv_layers` and `kv_from_layers`; `prefill_lens` are its
    prefill signatures, None when it takes any length (eager PyTorch).
    """

    def __init__(self, prefill_lens: tuple[int, ...] | None, kv_cache_max: int):
        self.prefill_lens = tuple(prefill_lens) if prefill_lens else None
        self.kv_cache_max = kv_cache_max

    def release(self) -> None:
        """Frees what the runner can reopen; only a flatbuffer's runtime is worth it."""

    def prefill_at(self, tokens, start: int, kv, pad_to: int | None = None, pad: int = 0):
        """Prefills `tokens` at positions start.., padded with `pad` to `pad_to` (default: the smallest
        signature that fits; no padding in eager mode). Returns the real positions' logits and the cache."""
        n, fixed = len(tokens), self.prefill_lens
        if pad_to is None:
            pad_to = signature_for(n, fixed) if fixed else n
        if pad_to < n or (fixed and pad_to not in fixed):
            raise HarnessError(f"cannot prefill {n} tokens through a signature of length {pad_to}; "
                               f"the stage has {fixed or 'any length'}")
        check_positions(start, pad_to, self.kv_cache_max,
                        f"prefilling {n} tokens" + (f" padded to {pad_to}" if pad_to > n else ""))
        padded = np.full((1, pad_to), pad, np.int32)
        padded[0, :n] = tokens
        positions = np.arange(start, start + pad_to, dtype=np.int32)
        logits, kv = self.call(f"prefill_{pad_to}", padded, positions, kv)
        return logits[:n], kv

    def prefill(self, tokens, kv):
        return self.prefill_at(tokens, 0, kv)

    def decode(self, token, pos: int, kv):
        check_positions(pos, 1, self.kv_cache_max, "decoding")
        logits, kv = self.call("decode", np.array([[token]], np.int32), np.array([pos], np.int32), kv)
        return logits[0], kv


class _TorchCache:
    """The KV container of the PyTorch stages: litert-torch's KVCache, built from the model config."""

    def empty_kv(self):
        from litert_torch.generative.layers import kv_cache

        return kv_cache.KVCache.from_model_config(self.kv_cache_max, self.config)

    def kv_layers(self, kv) -> KVLayers:
        """Per layer (K, V) as numpy copies."""
        from litert_torch.generative.layers import kv_cache

        if any(entry.kv_layout != kv_cache.KV_LAYOUT_DEFAULT for entry in kv.caches):
            raise HarnessError("the KV cache uses a transposed layout; the KV properties read only the default "
                               "[batch, slot, heads, head_dim] layout")
        return [(e.k_cache.detach().numpy().copy(), e.v_cache.detach().numpy().copy()) for e in kv.caches]

    def kv_from_layers(self, layers: KVLayers):
        """The KVCache holding `layers` (copied)."""
        import torch
        from litert_torch.generative.layers import kv_cache

        return kv_cache.KVCache(tuple(kv_cache.KVCacheEntry(torch.from_numpy(k.copy()), torch.from_numpy(v.copy()),
                                                            e.kv_layout)
                                      for e, (k, v) in zip(self.empty_kv().caches, layers)))


class ReauthoredRunner(_TorchCache, Runner):
    """The re-authored PyTorch model in eager mode, prefilling exactly the prompt (no padding)."""

    def __init__(self, model, kv_cache_max: int):
        from litert_torch.generative.utilities import export_config

        super().__init__(None, kv_cache_max)
        self.model, self.config = model, model.config
        self.export_config = export_config.ExportConfig(output_logits_on_prefill=True)

    def call(self, name, tokens, positions, kv):
        """The model's forward; eager mode takes any length, so the signature name is not needed."""
        import torch

        with torch.no_grad():
            out = self.model(
                torch.as_tensor(tokens, dtype=torch.int32),
                torch.as_tensor(positions, dtype=torch.int32),
                kv,
                export_config=self.export_config,
            )
        return out["logits"][0].numpy(), out["kv_cache"]


class ExportedRunner(_TorchCache, Runner):
    """The torch.export programs of each signature, run as PyTorch modules."""

    def __init__(self, programs: dict[str, torch.export.ExportedProgram], config, prefill_lens, kv_cache_max):
        super().__init__(prefill_lens, kv_cache_max)
        self.modules = {name: ep.module() for name, ep in programs.items()}
        self.config = config

    def call(self, name, tokens, positions, kv):
        import torch

        with torch.no_grad():
            out = self.modules[name](
                tokens=torch.as_tensor(tokens), input_pos=torch.as_tensor(positions), kv_cache=kv
            )
        return out["logits"][0].numpy(), out["kv_cache"]


_TFLITE_KV = re.compile(r"kv_cache_([kv])_(\d+)$")


class TFLiteRunner(Runner):
    """A multi-signature flatbuffer in LiteRT's CompiledModel on the CPU (XNNPack), as LiteRT-LM runs it.

    XNNPack packs each weight into the layout its kernels read, once per signature unless a weight cache
    is given. Here it goes to XNNPack's weight cache held in memory (":memory:", private to this runner,
    gone with it), which every signature shares. Measured on the real Gemma 3 270M's float flatbuffer
    (open, every prefill signature, 4 decodes): peak RSS 2.7 GiB, against 5.2 GiB in the Interpreter and
    5.2 GiB in CompiledModel without the cache; the default suite's 318 records are the Interpreter's to
    the bit. `release()` still drops the model, and the next call opens it again.
    """

    WEIGHT_CACHE = ":memory:"  # XNNPack's in-memory weight cache (a file path would persist it)

    def __init__(self, path, prefill_lens, kv_cache_max, num_threads: int = 2):
        super().__init__(prefill_lens, kv_cache_max)
        self.path, self.num_threads = Path(path), num_threads
        self.model, self.buffers = self._open(), {}
        decode_inputs = self.model.get_input_tensor_details("decode")
        self.kv_specs = {k: (tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in decode_inputs.items()
                         if k.startswith("kv_cache_")}

    def _open(self):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                          cpu_options=CpuOptions(num_threads=self.num_threads,
                                                 xnnpack_weight_cache_path=self.WEIGHT_CACHE))
        model = CompiledModel.from_file(str(self.path), options=options)
        missing = {f"prefill_{n}" for n in self.prefill_lens} | {"decode"}
        missing -= set(model.get_signature_list())
        if missing:
            raise HarnessError(f"flatbuffer {self.path} lacks signatures {sorted(missing)}; reconvert it with --no-cache")
        return model

    def release(self) -> None:
        """Frees the model and its packed weights; the runner reopens it when next called."""
        self.model, self.buffers = None, {}

    def _signature(self, name: str):
        """The signature's input and output buffers, made once per open model, each with its shape and dtype."""
        if name not in self.buffers:
            model = self.model
            self.buffers[name] = tuple(
                {n: (create(name, n), tuple(d["shape"]), np.dtype(d["dtype"])) for n, d in details(name).items()}
                for create, details in ((model.create_input_buffer_by_name, model.get_input_tensor_details),
                                        (model.create_output_buffer_by_name, model.get_output_tensor_details)))
        return self.buffers[name]

    def empty_kv(self):
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.kv_specs.items()}

    def kv_layers(self, kv) -> KVLayers:
        """Per layer (K, V) as numpy copies, from the kv_cache_{k,v}_<layer> inputs."""
        found = {}
        for name, value in kv.items():
            kind, layer = _TFLITE_KV.search(name).groups()
            found[(int(layer), kind)] = np.array(value, copy=True)
        return [(found[(i, "k")], found[(i, "v")]) for i in range(len(found) // 2)]

    def kv_from_layers(self, layers: KVLayers):
        """The signature inputs holding `layers`, in the flatbuffer's dtypes."""
        return {name: layers[int(m.group(2))][0 if m.group(1) == "k" else 1].astype(dtype)
                for name, (_, dtype) in self.kv_specs.items() for m in [_TFLITE_KV.search(name)]}

    def call(self, name, tokens, positions, kv):
        """One run of signature `name`. Every input is written, each checked against its shape: a buffer
        keeps what the previous call left in it, so an input left out would run on stale values."""
        if self.model is None:
            self.model = self._open()
        inputs, outputs = self._signature(name)
        given = {"tokens": tokens, "input_pos": positions, **kv}
        if set(given) != set(inputs):
            raise HarnessError(f"signature {name} of {self.path.name} takes inputs {sorted(inputs)}, "
                               f"not {sorted(given)}")
        for key, (buffer, shape, dtype) in inputs.items():
            value = np.asarray(given[key])
            if value.shape != shape:
                raise HarnessError(f"input {key} of signature {name} has shape {list(value.shape)}; "
                                   f"the flatbuffer takes {list(shape)}")
            buffer.write(np.ascontiguousarray(value, dtype=dtype))
        self.model.run_by_name(name, {k: b for k, (b, _, _) in inputs.items()},
                               {k: b for k, (b, _, _) in outputs.items()})
        out = {k: b.read(math.prod(shape), dtype).reshape(shape) for k, (b, shape, dtype) in outputs.items()}
        return out["logits"][0], {k: out[k] for k in self.kv_specs}
