"""Generated inputs of the prefill/decode and KV-cache properties, and the Hypothesis profiles.

Every case is defined once, as a function of an integer source `draw(lo, hi)`. Hypothesis
drives it in tests (shrinking a failure to a minimal case); a seeded numpy generator drives
it in `harness verify` (a fixed, bounded set of cases per stage).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

PROFILE_ENV = "HYPOTHESIS_PROFILE"
CI, THOROUGH = "ci", "thorough"
PROFILES = {
    # Reproducible in CI: the same examples every run, a failure re-appears with the same command.
    CI: dict(max_examples=6, derandomize=True, database=None, print_blob=True),
    # Nightly: many more examples, fresh ones each run, failures remembered in the local database.
    THOROUGH: dict(max_examples=200, derandomize=False, print_blob=True),
}

Draw = Callable[[int, int], int]  # an integer in [lo, hi], both inclusive
MAX_CONTINUATION = 4  # decodes after the prompt: enough to cross the padding, cheap in eager mode


@dataclasses.dataclass(frozen=True)
class Shape:
    """What bounds a case: the vocabulary and the exported prefill lengths and cache size."""

    vocab: int
    prefill_lens: tuple[int, ...]
    kv_cache_max: int

    @property
    def longest_prefill(self) -> int:
        return max(self.prefill_lens)


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated input, shared by every property (each reads the fields it needs)."""

    prompt: np.ndarray  # tokens 1..vocab-1 (0 is the padding token)
    split: int  # 1..len(prompt): prefill length before decoding, and the causality cut
    chunks: tuple[int, ...]  # sizes of a chunked prefill, summing to len(prompt)
    tail: np.ndarray  # different tokens for the positions after `split` (causality)
    pad: int  # a pad token other than 0 (padding invariance)
    continuation: np.ndarray  # tokens decoded after the prompt, at least one

    def __repr__(self) -> str:  # what a shrunk failure prints
        return (f"Case(prompt={self.prompt.tolist()}, split={self.split}, chunks={self.chunks}, "
                f"tail={self.tail.tolist()}, pad={self.pad}, continuation={self.continuation.tolist()})")


def draw_tokens(draw: Draw, vocab: int, length: int) -> np.ndarray:
    return np.array([draw(1, vocab - 1) for _ in range(length)], dtype=np.int64)


def draw_chunking(draw: Draw, length: int, max_chunk: int) -> tuple[int, ...]:
    """A random composition of `length` into chunks of at most `max_chunk` tokens."""
    chunks, left = [], length
    while left:
        chunks.append(draw(1, min(left, max_chunk)))
        left -= chunks[-1]
    return tuple(chunks)


def draw_case(draw: Draw, shape: Shape) -> Case:
    """A prompt and continuation that fit one prefill signature together, so a one-shot prefill is the reference."""
    longest = shape.longest_prefill
    length = draw(2, longest - 1)
    split = draw(1, length)
    return Case(
        prompt=draw_tokens(draw, shape.vocab, length),
        split=split,
        chunks=draw_chunking(draw, length, longest),
        tail=draw_tokens(draw, shape.vocab, length - split),
        pad=draw(1, shape.vocab - 1),
        continuation=draw_tokens(draw, shape.vocab, draw(1, min(MAX_CONTINUATION, longest - length))),
    )


def cases(shape: Shape):
    """The Hypothesis strategy of cases for one export shape."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        return draw_case(lambda lo, hi: draw(st.integers(lo, hi)), shape)

    return build()


def seeded_cases(shape: Shape, count: int, seed: int) -> list[Case]:
    """A fixed list of cases for `harness verify`: the same for the same seed, no Hypothesis involved."""
    rng = np.random.default_rng(seed)
    return [draw_case(lambda lo, hi: int(rng.integers(lo, hi + 1)), shape) for _ in range(count)]


def load_profile(name: str | None = None) -> str:
    """Registers the profiles (idempotent) and loads one: `name`, else $HYPOTHESIS_PROFILE, else ci."""
    from hypothesis import HealthCheck, settings

    for profile, values in PROFILES.items():
        settings.register_profile(profile, deadline=None, suppress_health_check=[HealthCheck.too_slow], **values)
    name = name or os.environ.get(PROFILE_ENV, CI)
    if name not in PROFILES:
        from harness.errors import HarnessError

        raise HarnessError(f"unknown Hypothesis profile {name!r} in ${PROFILE_ENV}; choose from {', '.join(PROFILES)}")
    settings.load_profile(name)
    return name


def reproduce_command(nodeid: str, profile: str | None = None) -> str:
    """The exact command that re-runs one property test with the same (derandomized) examples."""
    profile = profile or os.environ.get(PROFILE_ENV, CI)
    return f"{PROFILE_ENV}={profile} pytest {nodeid!r}"
