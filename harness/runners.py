"""One runner per stage, all with the prefill/decode interface of the converted model."""

from __future__ import annotations

import numpy as np
import torch

from harness.errors import HarnessError
from harness.workload import Trajectory


def signature_for(prompt_len: int, prefill_lens: tuple[int, ...]) -> int:
    """The smallest prefill signature a prompt fits in (the rest is padding)."""
    fitting = [n for n in sorted(prefill_lens) if n >= prompt_len]
    if not fitting:
        raise HarnessError(
            f"a prompt of {prompt_len} tokens exceeds the largest prefill signature ({max(prefill_lens)}); "
            "shorten the workload's prompts or export a longer prefill length"
        )
    return fitting[0]


def padded(tokens: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens padded with 0 to the signature length, and positions 0..length-1."""
    out = np.zeros((1, length), dtype=np.int32)
    out[0, : len(tokens)] = tokens
    return out, np.arange(length, dtype=np.int32)


def check_position(pos: int, kv_cache_max: int) -> None:
    """A write past the cache would be clamped silently by the runtime: refuse it instead."""
    if not 0 <= pos < kv_cache_max:
        raise HarnessError(
            f"position {pos} is outside the KV cache (kv_cache_max={kv_cache_max}); "
            "shorten the sequence or export a larger KV cache"
        )


def run_trajectory(runner, trajectory: Trajectory) -> np.ndarray:
    """Prefill the prompt, decode the rest teacher-forced: logits at every position but the last."""
    p = trajectory.prompt_len
    tokens = trajectory.tokens
    if len(tokens) - 1 > runner.kv_cache_max:
        raise HarnessError(
            f"a trajectory of {len(tokens) - 1} positions goes past kv_cache_max={runner.kv_cache_max}; "
            "shorten the workload or export a larger KV cache"
        )
    kv = runner.empty_kv()
    logits, kv = runner.prefill(tokens[:p], kv)
    rows = [logits]
    for pos in range(p, len(tokens) - 1):
        step, kv = runner.decode(int(tokens[pos]), pos, kv)
        rows.append(step[None])
    return np.concatenate(rows).astype(np.float32)


class ReauthoredRunner:
    """The re-authored PyTorch model in eager mode, prefilling exactly the prompt (no padding)."""

    def __init__(self, model, kv_cache_max: int):
        from litert_torch.generative.utilities import export_config

        self.model = model
        self.kv_cache_max = kv_cache_max
        self.export_config = export_config.ExportConfig(output_logits_on_prefill=True)

    def empty_kv(self):
        from litert_torch.generative.layers import kv_cache

        return kv_cache.KVCache.from_model_config(self.kv_cache_max, self.model.config)

    def _call(self, tokens, positions, kv):
        with torch.no_grad():
            out = self.model(
                torch.as_tensor(tokens, dtype=torch.int32),
                torch.as_tensor(positions, dtype=torch.int32),
                kv,
                export_config=self.export_config,
            )
        return out["logits"][0].numpy(), out["kv_cache"]

    def prefill(self, tokens, kv):
        return self._call(np.asarray(tokens)[None], np.arange(len(tokens)), kv)

    def decode(self, token, pos, kv):
        check_position(pos, self.kv_cache_max)
        logits, kv = self._call([[token]], [pos], kv)
        return logits[0], kv


class _FixedShapeRunner:
    """Shared padding logic of runners whose prefill has fixed signature lengths."""

    def __init__(self, prefill_lens: tuple[int, ...], kv_cache_max: int):
        self.prefill_lens = tuple(prefill_lens)
        self.kv_cache_max = kv_cache_max

    def release(self) -> None:
        """Frees what the runner can reopen; only a flatbuffer's interpreter is worth it."""

    def prefill(self, tokens, kv):
        length = signature_for(len(tokens), self.prefill_lens)
        padded_tokens, positions = padded(tokens, length)
        logits, kv = self.call(f"prefill_{length}", padded_tokens, positions, kv)
        return logits[: len(tokens)], kv

    def decode(self, token, pos, kv):
        check_position(pos, self.kv_cache_max)
        logits, kv = self.call("decode", np.array([[token]], np.int32), np.array([pos], np.int32), kv)
        return logits[0], kv


class ExportedRunner(_FixedShapeRunner):
    """The torch.export programs of each signature, run as PyTorch modules."""

    def __init__(self, programs: dict[str, torch.export.ExportedProgram], config, prefill_lens, kv_cache_max):
        super().__init__(prefill_lens, kv_cache_max)
        self.modules = {name: ep.module() for name, ep in programs.items()}
        self.config = config

    def empty_kv(self):
        from litert_torch.generative.layers import kv_cache

        return kv_cache.KVCache.from_model_config(self.kv_cache_max, self.config)

    def call(self, name, tokens, positions, kv):
        with torch.no_grad():
            out = self.modules[name](
                tokens=torch.as_tensor(tokens), input_pos=torch.as_tensor(positions), kv_cache=kv
            )
        return out["logits"][0].numpy(), out["kv_cache"]


class TFLiteRunner(_FixedShapeRunner):
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

    def call(self, name, tokens, positions, kv):
        if self.runners is None:
            self.runners = self._open()
        out = self.runners[name](tokens=tokens, input_pos=positions, **kv)
        return out["logits"][0], {k: out[k] for k in self.kv_specs}
