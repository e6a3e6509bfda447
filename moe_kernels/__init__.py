"""MoE expert-computation kernels behind one interface, chosen by name or by feature detection.

The interface (`MoEKernels`) is three stages of the expert path: `permute` groups token copies by
expert, `grouped_mm` multiplies each expert's rows by its weight, `unpermute` weights and sums the
copies back per token. Implementations:
- `reference`: per-expert / per-slot loops in plain PyTorch; the oracle for tests.
- `fast`: sort-based permute, `torch._grouped_mm` (falls back to a loop where unsupported),
  index_add unpermute.
- `npu`: `fast` with the GEMM through torch_npu's npu_grouped_matmul; only when torch_npu is present.
This package imports only torch and the standard library.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .base import PermuteState
from .fast import FastKernels, grouped_mm_works
from .npu import NpuKernels, load_torch_npu
from .reference import ReferenceKernels

__all__ = [
    "MoEKernels",
    "PermuteState",
    "ReferenceKernels",
    "FastKernels",
    "NpuKernels",
    "get_kernels",
    "available_kernels",
    "KERNEL_NAMES",
]

KERNEL_NAMES = ("auto", "reference", "fast", "npu")


@runtime_checkable
class MoEKernels(Protocol):
    name: str

    def permute(self, x_TD: Tensor, expert_idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, PermuteState]:
        """Group token copies by expert. expert_idx_TK: int64 [T, K]; entries equal to -1 are dropped
        assignments (capacity dropping) and are excluded. Returns x_ND (N = number of kept assignments,
        rows ordered by expert ascending, stable within an expert by (token, k) order),
        tokens_per_expert_E (int64 [num_experts], always on CPU), and the state for unpermute."""
        ...

    def grouped_mm(self, x_ND: Tensor, w_EDF: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """y_NF: rows of expert e multiplied by w_EDF[e]. Autograd to x and w, experts with zero
        tokens allowed, fp32 and bf16."""
        ...

    def unpermute(self, y_ND: Tensor, state: PermuteState, weights_TK: Tensor) -> Tensor:
        """out_TD[t] = sum_k weights_TK[t, k] * y(row of assignment (t, k)); dropped assignments give 0.
        Autograd to y and weights. Accumulates in at least fp32; output dtype = y dtype."""
        ...


def available_kernels() -> list[str]:
    """Names `get_kernels` can build in this environment ('fast' always works: its GEMM degrades to a
    loop where `torch._grouped_mm` is unusable)."""
    names = ["reference", "fast"]
    if load_torch_npu() is not None:
        names.append("npu")
    return names


def get_kernels(name: str = "auto", device_type: str = "cpu") -> MoEKernels:
    """'reference', 'fast', 'npu', or 'auto'.

    'auto' picks, for `device_type`: npu when device_type is 'npu' and torch_npu is importable; else
    fast when torch._grouped_mm exists and passes a forward/backward probe on that device in fp32 or
    bf16; else reference.
    """
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernels {name!r}; allowed: {', '.join(repr(n) for n in KERNEL_NAMES)}")
    if name == "reference":
        return ReferenceKernels()
    if name == "fast":
        return FastKernels()
    if name == "npu":
        if load_torch_npu() is None:
            raise ValueError("kernels 'npu' need torch_npu (with npu_grouped_matmul), which is not importable here")
        return NpuKernels()
    if device_type == "npu" and load_torch_npu() is not None:
        return NpuKernels()
    if grouped_mm_works(device_type, torch.float32) or grouped_mm_works(device_type, torch.bfloat16):
        return FastKernels()
    return ReferenceKernels()
