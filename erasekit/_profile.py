"""Wall time and peak memory of a block of work (CUDA peak on GPU, peak RSS on CPU)."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Usage:
    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = "cpu_rss"  # "cuda_max_allocated" on GPU


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # non-Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def measure(device: torch.device | str | None = None, interval_s: float = 0.01):
    """Measure the enclosed block; yields a :class:`Usage` that is filled in when the block exits.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` after a reset; on CPU a sampling thread
    records the largest resident set size seen during the block.
    """
    usage = Usage()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    stop = threading.Event()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        usage.memory_kind = "cuda_max_allocated"
        sampler = None
    else:
        peak = [_rss_bytes()]

        def sample():
            while not stop.wait(interval_s):
                peak[0] = max(peak[0], _rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield usage
    finally:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            usage.peak_memory_bytes = int(torch.cuda.max_memory_allocated(dev))
        usage.wall_time_s = time.perf_counter() - t0
        stop.set()
        if sampler is not None:
            sampler.join()
            usage.peak_memory_bytes = max(peak[0], _rss_bytes())
