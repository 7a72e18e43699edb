"""Which implementation a kernel call uses: `kernels=auto|triton|torch` resolved for a device."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

KERNEL_MODES = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton's CPU interpreter is on; it must be set before the kernel modules are first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_kernels(mode: str, device: torch.device | str) -> str:
    """The implementation ("triton" or "torch") that `mode` means for tensors on `device`."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernels '{mode}'. Valid kernels: {', '.join(KERNEL_MODES)}.")
    device = torch.device(device)
    runnable = triton_available() and (device.type == "cuda" or triton_interpreted())
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if runnable and device.type == "cuda" else "torch"
    if not triton_available():
        raise ValueError("kernels=triton needs the triton package (pip install triton); use kernels=auto or torch.")
    if not runnable:
        raise ValueError(f"kernels=triton needs a CUDA device (or TRITON_INTERPRET=1), got device {device}.")
    return "triton"


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches a kernel on the CURRENT CUDA device, not on its tensors' device: a layer of a model split over
    GPUs (`device_map="auto"`) runs its kernels under its own device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_first_tensor_device(launch: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run a Triton launcher under the device of its first argument (`on_device`)."""

    @functools.wraps(launch)
    def call(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with on_device(first.device):
            return launch(first, *args, **kwargs)

    return call


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors to fill (split-K grids aim for a few programs per SM); 4 off CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels upcast their `tl.dot` operands to fp32 (with IEEE precision).

    fp32 inputs: so results match the fp32 reference instead of TF32's 1e-3. Under the interpreter always,
    because its bf16 `tl.dot` returns garbage (triton 3.9, numpy has no bf16); bf16 values are exact in fp32
    and products accumulate in fp32 either way, so this changes only the summation order.
    """
    return dtype == torch.float32 or triton_interpreted()
