"""This process's memory: what it holds, what it peaked at, and handing freed memory back.

A real model's stages each hold GiBs (XNNPack's packed weights, XlaCallModule's compiled
programs); the pipeline frees each stage's state when it is done, and this makes the free real.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os

# TensorFlow's oneDNN CPU allocator is a BFC pool that keeps every block it frees (TensorFlow turns oneDNN on
# by default only on CPUs with AVX-512 VNNI or BF16, AMX and the like; not on an AVX2-only EPYC, so no pool
# there). Measured in this environment (TensorFlow 2.21): 1 GiB of tensors made and dropped left RSS 1.1 GiB
# up with the pool, back where it started with the system allocator; on the real Gemma 3 270M about 2.2 GiB
# stayed held after the stablehlo stage had dropped its modules. Read once, when TensorFlow loads.
TF_SYSTEM_ALLOCATOR = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"

# glibc maps a block over its mmap threshold (at most 32 MiB) afresh at each malloc and unmaps it at free, so
# every such block is faulted in again, a 4 KiB page at a time, each page zeroed by the kernel. Real text's
# float64 softmax of 16 rows over a 262k vocabulary is exactly such a 32 MiB tensor, thousands of times a run:
# the real model's default run took 40.9 M page faults (measured under py-spy) and 187 s of system time in
# 354 s. PyTorch's CPU allocator asks for transparent huge pages (2 MiB aligned, madvise) for every tensor of
# 2 MiB or more when THP_MEM_ALLOC_ENABLE=1, read at its first allocation: measured on that loop, 3.7 M faults
# and 9.5 s of system time -> 0.24 M and 2.2-3.4 s. Only torch's tensors: glibc.malloc.hugetlb=1 did as much for
# the loop but backed every process's heap with huge pages, and the test suite took 1.05x as long.
TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:  # no procfs (not Linux)
        pass
    return math.nan


def peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM starts afresh at exec; getrusage's maxrss keeps the parent's)."""
    return _status_mb("VmHWM")


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def release_freed(min_rss_mb: float = 2048) -> None:
    """Collects cycles and returns freed heap pages to the OS, once the process holds `min_rss_mb`.

    glibc keeps freed blocks in its arenas: measured on the real Gemma 3 270M, a StableHLO stage
    freed in Python still held 3.5 GiB until malloc_trim, enough to OOM the later conversions.
    Below the threshold (a tiny pair's run peaks near 1.6 GiB) it does nothing: a full collection
    costs ~0.75 s with torch and TensorFlow loaded (measured), ~70 s over the tiny suite's stages.
    """
    if current_rss_mb() < min_rss_mb:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def use_system_allocator() -> None:
    """Has TensorFlow, when it loads in this process or its children, allocate through malloc, so what a stage
    frees can go back to the OS (release_freed). Called before anything imports TensorFlow; a value the user
    set wins."""
    os.environ.setdefault(TF_SYSTEM_ALLOCATOR, "true")


def use_huge_pages() -> None:
    """Has torch back its large tensors with transparent huge pages (above), in this process when called before
    torch allocates and in the processes it starts; a value the user set wins. Where transparent huge pages are
    "never" it changes nothing."""
    os.environ.setdefault(TORCH_HUGE_PAGES, "1")
