"""Clocks and memory readings. On CUDA, phases synchronise before reading clocks and report
`max_memory_allocated` reset per phase. On CPU (Linux), each phase resets the kernel's RSS high-water mark
(`/proc/self/clear_refs`) and reports the peak RSS reached during the phase (`cpu_peak_rss_per_phase`: the
whole process, model weights included); where that reset is not allowed, the process-lifetime peak RSS
(`cpu_process_peak_rss`). tracemalloc would not help: it sees Python's allocator, not torch's tensors."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PhaseReading:
    seconds: float = 0.0
    peak_mem_bytes: int | None = None


def process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_bytes() -> int:
    """VmHWM: the peak RSS since the process started or the last `reset_peak_rss()`."""
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else process_peak_rss_bytes()


class Stopwatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.rss_per_phase = not self.cuda and reset_peak_rss()
        # A model split over GPUs (device_map) runs on all of them: every one is synchronised, and peaks are summed
        # (this process's allocations only, so a GPU it does not use adds 0).
        self.devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if self.cuda else []

    @property
    def memory_kind(self) -> str:
        if self.cuda:
            return "cuda_max_allocated_per_phase"
        return "cpu_peak_rss_per_phase" if self.rss_per_phase else "cpu_process_peak_rss"

    def peak_mem_bytes(self) -> int:
        if self.cuda:
            return sum(int(torch.cuda.max_memory_allocated(device)) for device in self.devices)
        return peak_rss_since_reset_bytes() if self.rss_per_phase else process_peak_rss_bytes()

    def sync(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseReading]:
        reading = PhaseReading()
        self.sync()
        if self.cuda:
            for device in self.devices:
                torch.cuda.reset_peak_memory_stats(device)
        elif self.rss_per_phase:
            reset_peak_rss()
        start = time.perf_counter()
        yield reading
        self.sync()
        reading.seconds = time.perf_counter() - start
        reading.peak_mem_bytes = self.peak_mem_bytes()
