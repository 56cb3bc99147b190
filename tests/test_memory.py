"""What a harness process frees reaches the OS: TensorFlow's tensors included (harness.memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.memory import TF_SYSTEM_ALLOCATOR, TORCH_HUGE_PAGES

# In a fresh process, as every harness process starts: the package first, then TensorFlow; 1 GiB of computed
# tensors made and dropped; the RSS it leaves held after release_freed. TensorFlow turns oneDNN (and its pool)
# on by default only on CPUs with AVX-512 VNNI or BF16, AMX and the like: on an AVX2-only AMD
# EPYC the control below kept 2 MiB, not 1.1 GiB, so the probe turns oneDNN on, as those CPUs have it.
PROBE = """
import json, os
import harness
from harness.memory import current_rss_mb, release_freed
import tensorflow as tf
start = current_rss_mb()
held = [tf.random.uniform((1024, 1024, 64)) + 1.0 for _ in range(4)]
del held
release_freed(min_rss_mb=0)
print(json.dumps({"left_mib": current_rss_mb() - start, "allocator": os.environ.get(%r)}))
""" % TF_SYSTEM_ALLOCATOR


def probed(code: str, variable: str, value: str | None, **env_extra: str) -> dict:
    """The JSON line `code` prints in a fresh process, with `variable` set to `value` (None: left unset)."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        env[variable] = value
    out = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def held_after_free(env_value: str | None) -> dict:
    return probed(PROBE, TF_SYSTEM_ALLOCATOR, env_value, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="1")


def test_tensorflow_memory_a_harness_process_frees_goes_back_to_the_os():
    probe = held_after_free(None)
    assert probe["allocator"] == "true"  # set by importing harness, before TensorFlow loaded
    assert probe["left_mib"] < 256, probe


def test_a_user_set_allocator_wins_and_tensorflows_pool_then_keeps_what_it_freed():
    """The control: with oneDNN's pool, the same 1 GiB stays held, so the test above measures the setting."""
    probe = held_after_free("false")
    assert probe["allocator"] == "false"
    assert probe["left_mib"] > 768, probe


# In a fresh process, as every harness process starts (the package, then torch): 40 float64 tensors of 48 MiB
# (over glibc's largest mmap threshold), each written through and freed; the page faults that took.
FAULTS = """
import json, os, resource
import harness
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    block = torch.ones(6 << 20, dtype=torch.float64)
    del block
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "setting": os.environ.get(%r)}))
""" % TORCH_HUGE_PAGES
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PAGES_4K = 40 * (48 << 20) // 4096


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="transparent huge pages are off (or not Linux): the setting changes nothing here")
def test_a_harness_process_backs_large_tensors_with_huge_pages_and_a_user_setting_wins():
    ours, theirs = probed(FAULTS, TORCH_HUGE_PAGES, None), probed(FAULTS, TORCH_HUGE_PAGES, "0")
    assert (ours["setting"], theirs["setting"]) == ("1", "0")  # set by importing harness; the user's kept
    # With THP "always" both are huge pages and the control cannot tell.
    if "[madvise]" in THP.read_text():
        assert theirs["faults"] > PAGES_4K * 0.9, theirs
    assert ours["faults"] < PAGES_4K / 8, (ours, theirs)
