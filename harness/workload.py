"""The prompts every stage runs, and the HF greedy trajectories that make stages comparable.

Every stage is run teacher-forced along the HF reference's greedy trajectory: prefill
the prompt, then decode the reference's tokens one by one. Its logits are then
comparable position by position, and its greedy output equals the reference's exactly
when its argmax matches the reference's token at every generated position.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import numpy as np

from harness.errors import HarnessError
from harness.pairs import ModelPair, Workload

if TYPE_CHECKING:  # torch is imported by the functions that run a model, so pair files load without it
    import torch


@dataclasses.dataclass
class Trajectory:
    prompt_len: int
    tokens: np.ndarray  # prompt + greedy continuation, int64 [P + N]

    @property
    def greedy(self) -> np.ndarray:
        return self.tokens[self.prompt_len:]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextWorkload(Workload):
    """A real model's workload: prompt i is the first prompt_lens[i] ids of `prompts()[i]`, real text tokens."""

    prompts: Callable[[], list[list[int]]]


def make_prompts(pair: ModelPair) -> list[np.ndarray]:
    """Random token prompts of the workload's lengths, fixed by the pair's seed (token 0 is left for padding),
    or a TextWorkload's real-text prompts."""
    if isinstance(pair.workload, TextWorkload):
        return text_prompts(pair.workload)
    rng = np.random.default_rng(pair.seed + 1)
    vocab = int(pair.hf_config.get("vocab_size", 256))
    return [rng.integers(1, vocab, size=n, dtype=np.int64) for n in pair.workload.prompt_lens]


def text_prompts(workload: TextWorkload) -> list[np.ndarray]:
    """The real-text prompts of a TextWorkload, each cut to its prompt length."""
    sources = workload.prompts()
    if len(sources) != len(workload.prompt_lens) or any(len(s) < n for s, n in zip(sources, workload.prompt_lens)):
        raise HarnessError(
            f"the workload asks for prompts of {list(workload.prompt_lens)} tokens but its prompts() gives "
            f"{[len(s) for s in sources]}; list one long-enough prompt per prompt length"
        )
    return [np.asarray(s[:n], dtype=np.int64) for s, n in zip(sources, workload.prompt_lens)]


def greedy_trajectory(hf_model: torch.nn.Module, prompt: np.ndarray, new_tokens: int) -> tuple[Trajectory, np.ndarray]:
    """Greedy continuation by the HF reference, and its logits at every position but the last.

    Each step reads the whole sequence again (no KV cache: the reference's hidden states are those of one
    forward) but takes the head's logits at the last position only (`logits_to_keep=1`): over the real model's
    262k vocabulary the head of every position was most of the step.
    """
    import torch

    tokens = torch.as_tensor(prompt, dtype=torch.long)[None]
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = hf_model(tokens, logits_to_keep=1).logits[0, -1]
            tokens = torch.cat([tokens, logits.argmax().view(1, 1)], dim=1)
        logits = hf_model(tokens[:, :-1]).logits[0].float().numpy()
    return Trajectory(len(prompt), tokens[0].numpy()), logits


def greedy_of(logits: np.ndarray, trajectory: Trajectory) -> np.ndarray:
    """The tokens a stage would generate greedily along the trajectory."""
    return logits[trajectory.prompt_len - 1:].argmax(-1)
