"""How a CPU process of fcnseg gets its memory: large tensors on huge pages, and freed blocks kept for reuse.

A training step allocates and frees the same large buffers every time: fc6's weight gradient alone is 411 MB in
VGG16's FCN, and the activations and their gradients at 320 x 320 come to several hundred MB more. glibc's malloc
serves each block over its mmap threshold (32 MB at most) with a fresh mapping and unmaps it on free, so every step
page-faults those buffers in again, 4 KB at a time, and the kernel zeroes each page: about 180,000 faults and a
fifth of an FCN-8s step's time on a 2-core AMD EPYC. Inference does the same with its activations (400 MB a
layer for a batch of 8 images of 375 x 500). Two settings remove that:

- PyTorch's ``THP_MEM_ALLOC_ENABLE``: its CPU allocator aligns blocks of 2 MB and more to 2 MB and advises the
  kernel to back them with transparent huge pages (one fault per 2 MB);
- glibc's ``mallopt``: no mmap for large blocks, and no trimming of the heap's free top, so a freed buffer is
  reused by the next step without a fault. Memory then goes back to the system when the process ends.

Neither changes a computed value. This module imports nothing of torch: the first must be set before torch is
imported, which ``fcnseg``'s command line does first thing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
# glibc's malloc.h: the parameters of mallopt(3).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1


def request_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``) unless the variable is
    already set (``THP_MEM_ALLOC_ENABLE=0`` turns it off). PyTorch reads it at its first allocation, so it takes
    effect only in a process that has not imported torch yet, and in the processes it starts; returns whether this
    process gets it."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return "torch" not in sys.modules and os.environ[HUGE_PAGES_ENV] == "1"


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep large freed blocks for reuse instead of unmapping them (mallopt: ``M_MMAP_MAX`` 0,
    ``M_TRIM_THRESHOLD`` 2 GB). For a process that allocates the same buffers step after step, as training and
    inference do; its memory stays at its peak until it ends. Returns False, changing nothing, where the C library
    is not glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def available_memory() -> int | None:
    """Bytes this process may still take: the kernel's estimate of what can be allocated without swapping
    (``MemAvailable`` in /proc/meminfo), or less where the process's cgroup (v2) has a limit closer at hand
    (``memory.max`` less ``memory.current``, as in a container). None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                found.append(max(0, int(limit) - int(g.read())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
