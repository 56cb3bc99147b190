"""One runner per stage, all with the prefill/decode interface of the converted model.

A stage's runner supplies `call` (one forward of one signature, unchecked), `empty_kv`, and
`kv_layers`/`kv_from_layers` (its KV container as per-layer numpy (K, V) pairs and back). `Runner`
builds on `call` the two ways every caller goes in: `prefill_at`, which pads to a signature at
any offset, and `decode`; both refuse positions past the cache before anything runs.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from harness.errors import HarnessError
from harness.workload import Trajectory

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
        """Frees what the runner can reopen; only a flatbuffer's interpreter is worth it."""

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
        with torch.no_grad():
            out = self.modules[name](
                tokens=torch.as_tensor(tokens), input_pos=torch.as_tensor(positions), kv_cache=kv
            )
        return out["logits"][0].numpy(), out["kv_cache"]


_TFLITE_KV = re.compile(r"kv_cache_([kv])_(\d+)$")


class TFLiteRunner(Runner):
    """A multi-signature flatbuffer in ai_edge_litert's interpreter (XNNPack by default on CPU).

    `release()` drops the interpreter and the next call opens it again: XNNPack packs weights
    per signature, so on the real Gemma 3 270M a float interpreter holds ~5 GiB and a
    weight_only_int8 one ~9.5 GiB (measured), too much to keep one open per recipe.
    """

    def __init__(self, path, prefill_lens, kv_cache_max, num_threads: int = 2):
        super().__init__(prefill_lens, kv_cache_max)
        self.path, self.num_threads = path, num_threads
        self.runners = self._open()
        decode_inputs = self.runners["decode"].get_input_details()
        self.kv_specs = {k: (tuple(v["shape"]), v["dtype"]) for k, v in decode_inputs.items()
                         if k.startswith("kv_cache_")}

    def _open(self) -> dict:
        from ai_edge_litert import interpreter as litert

        interpreter = litert.Interpreter(model_path=str(self.path), num_threads=self.num_threads)
        runners = {name: interpreter.get_signature_runner(name) for name in interpreter.get_signature_list()}
        missing = {f"prefill_{n}" for n in self.prefill_lens} | {"decode"}
        missing -= set(runners)
        if missing:
            raise HarnessError(f"flatbuffer {self.path} lacks signatures {sorted(missing)}; reconvert it with --no-cache")
        return runners

    def release(self) -> None:
        """Frees the interpreter and its packed weights; the runner reopens it when next called."""
        self.runners = None

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
        if self.runners is None:
            self.runners = self._open()
        out = self.runners[name](tokens=tokens, input_pos=positions, **kv)
        return out["logits"][0], {k: out[k] for k in self.kv_specs}
