"""The HF reference's run on a pair's workload, cached like the other artifacts: its greedy trajectories, its
logits along them and its attention entropy, which every later stage is held against.

The real Gemma 3 270M spends ~25 s of a warm run on them (its load, 48 greedy steps over a 262k vocabulary and
the attention maps), and a warm run otherwise recomputes the same numbers. Torch's kernels, and so the last bits
of those numbers, follow the CPU's instruction set and the number of threads, so both are in the key beside the
weights, the prompts, the code and the libraries. What a run is held against is always what the entry holds,
so cold and warm runs give the same records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from harness.cache import ArtifactCache, dir_digest
from harness.pairs import ModelPair, describe
from harness.workload import Trajectory, greedy_trajectory, make_prompts

REFERENCE_KIND = "reference"  # the cache's kind for HF reference runs
REFERENCE_FILE = "reference.npz"


@dataclasses.dataclass
class Reference:
    """What the HF stage gives later stages: per prompt, its greedy trajectory and the logits along it."""

    trajectories: list[Trajectory]
    logits: list[np.ndarray]  # per prompt, float32 [prompt + new tokens - 1, vocab]
    attention_entropy_ratio: float


def run_reference(pair: ModelPair, checkpoint: Path) -> Reference:
    """The HF model loaded from the checkpoint, run greedily on every prompt of the workload."""
    from harness.checkpoint import attention_entropy_ratio, load_hf

    model = load_hf(pair, checkpoint)
    prompts = make_prompts(pair)
    runs = [greedy_trajectory(model, p, pair.workload.new_tokens) for p in prompts]
    return Reference([t for t, _ in runs], [logits for _, logits in runs], attention_entropy_ratio(model, prompts))


def save_reference(reference: Reference, out: Path) -> None:
    arrays = {"attention_entropy_ratio": np.float64(reference.attention_entropy_ratio)}
    for i, (trajectory, logits) in enumerate(zip(reference.trajectories, reference.logits, strict=True)):
        arrays.update({f"prompt_len_{i}": np.int64(trajectory.prompt_len), f"tokens_{i}": trajectory.tokens,
                       f"logits_{i}": logits})
    np.savez(out / REFERENCE_FILE, **arrays)


def load_reference(entry: Path) -> Reference:
    with np.load(entry / REFERENCE_FILE, allow_pickle=False) as saved:
        count = sum(name.startswith("tokens_") for name in saved.files)
        trajectories = [Trajectory(int(saved[f"prompt_len_{i}"]), saved[f"tokens_{i}"]) for i in range(count)]
        return Reference(trajectories, [saved[f"logits_{i}"] for i in range(count)],
                         float(saved["attention_entropy_ratio"]))


def reference_key(pair: ModelPair, checkpoint: Path) -> dict:
    """Everything that shapes the reference's numbers: the checkpoint (what built it, its weights and config), the
    prompts and new tokens, the harness's code that runs it, the libraries, and the CPU and threads torch runs on."""
    import torch

    from harness.checkpoint import attention_entropy_ratio, checkpoint_key, load_hf
    from harness.provenance import VERSIONED_LIBRARIES
    from harness.records import isa_features, library_versions

    prompts = json.dumps([p.tolist() for p in make_prompts(pair)])
    return {
        "checkpoint": checkpoint_key(pair),
        "weights": dir_digest(checkpoint),
        "config": dir_digest(checkpoint, "*.json"),
        "prompts": hashlib.sha256(prompts.encode()).hexdigest(),
        "new_tokens": pair.workload.new_tokens,
        "reference_code": describe([run_reference, load_hf, greedy_trajectory, attention_entropy_ratio,
                                    save_reference, load_reference]),
        "versions": library_versions(VERSIONED_LIBRARIES),
        "cpu": {"torch_capability": torch.backends.cpu.get_cpu_capability(), "isa": isa_features()},
        "torch_threads": torch.get_num_threads(),
    }


def cached_reference(cache: ArtifactCache, pair: ModelPair, checkpoint: Path) -> tuple[Path, Reference]:
    """run_reference through the cache: the entry and the reference it holds."""
    entry = cache.get_or_build(REFERENCE_KIND, reference_key(pair, checkpoint),
                               lambda out: save_reference(run_reference(pair, checkpoint), out))
    return entry, load_reference(entry)
