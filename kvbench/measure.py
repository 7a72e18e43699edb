"""Clocks and memory readings. On CUDA, phases synchronise before reading clocks and report
`max_memory_allocated` reset per phase; on CPU, the process peak RSS is reported and labelled as such."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class PhaseReading:
    seconds: float = 0.0
    peak_mem_bytes: int | None = None


def process_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


class Stopwatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    @property
    def memory_kind(self) -> str:
        return "cuda_max_allocated_per_phase" if self.cuda else "cpu_process_peak_rss"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseReading]:
        reading = PhaseReading()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield reading
        self.sync()
        reading.seconds = time.perf_counter() - start
        reading.peak_mem_bytes = (
            int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else process_peak_rss_bytes()
        )
