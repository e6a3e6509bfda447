"""Device and backend choice (npu -> hccl, cuda -> nccl, cpu -> gloo) and the peak FLOP/s used for MFU.

torch_npu is optional: it is imported only when the npu device is asked for or detected, so CPU
and CUDA installs never need it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe_kernels.npu import import_torch_npu
from parallel.peaks import QUOTED_PEAKS_TFLOPS, quoted_peak

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def npu_available() -> bool:
    return import_torch_npu() is not None and torch.npu.is_available()


def resolve_device_type(requested: str = "auto") -> str:
    if requested == "auto":
        if npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "npu" and not npu_available():
        raise RuntimeError("device npu: torch_npu with a working CANN toolkit is required "
                           "(pip install 'ultramoe[npu]' on an Ascend host), or set train.device: cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA device is visible; set train.device: cpu or auto")
    return requested


def backend_for(device_type: str) -> str:
    return BACKENDS[device_type]


@dataclass
class Peak:
    flops_per_s: float
    source: str  # "quoted: <device>" or "measured: <how>"


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> Peak:
    """Best observed square-matmul throughput on this CPU: the honest MFU denominator when no
    vendor peak exists."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool and kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return Peak(best, f"measured: best {size}x{size} {str(dtype).replace('torch.', '')} matmul on "
                      f"{torch.get_num_threads()} threads")


def device_peak(device_type: str, dtype: torch.dtype) -> Peak:
    """The MFU denominator: measured on CPU at `dtype`; elsewhere the quoted dense BF16 peak
    (parallel/peaks.py), the convention MFU figures are published in, whatever the run's dtype."""
    if device_type == "cpu":
        return measure_matmul_peak(dtype)
    name = {"cuda": torch.cuda.get_device_name, "npu": lambda: torch.npu.get_device_name()}.get(device_type)
    found = quoted_peak(name() if name else "")
    source = ""
    if found is None and device_type == "npu":  # 910B SKUs report several names; assume the common one
        found, source = ("Ascend910B", QUOTED_PEAKS_TFLOPS["Ascend910B"]), " (assumed)"
    if found is not None:
        return Peak(found[1]["bf16"] * 1e12, f"quoted: {found[0]} bf16{source}")
    return Peak(float("nan"), "unknown device: MFU not reported")


def set_local_device(device_type: str, local_rank: int) -> None:
    """Bind this process to device `local_rank` of its node (one process per NPU/GPU, as torchrun
    starts them). CPU processes share the host: nothing to bind."""
    if device_type == "npu":
        import_torch_npu()
        torch.npu.set_device(local_rank)
    elif device_type == "cuda":
        torch.cuda.set_device(local_rank)
