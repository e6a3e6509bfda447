"""Shared pieces of the kernel interface: the permute state and the input checks.

Every implementation (reference, fast, npu) produces the same `PermuteState`, so a state made by one
implementation can be undone by another; tests rely on that to compare them stage by stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PermuteState:
    """What `unpermute` needs to undo a `permute`.

    assignment_N: int64 [N] on the device of x, flat index t * K + k of the (token, slot) pair that
        permuted row n came from. Rows are ordered by expert ascending, then by this index.
    token_N: int64 [N], assignment_N // K (kept so unpermute does not recompute it).
    tokens_per_expert_E: int64 [E] on CPU, rows per expert in permuted order.
    num_tokens, topk: T and K of the routing tensor.
    """

    assignment_N: Tensor
    token_N: Tensor
    tokens_per_expert_E: Tensor
    num_tokens: int
    topk: int

    @property
    def num_rows(self) -> int:
        return int(self.assignment_N.numel())


def check_permute_inputs(x_TD: Tensor, expert_idx_TK: Tensor, num_experts: int) -> None:
    if x_TD.dim() != 2:
        raise ValueError(f"permute: x_TD must be 2-D [T, D], got shape {tuple(x_TD.shape)}")
    if expert_idx_TK.dim() != 2 or expert_idx_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"permute: expert_idx_TK must be [T, K] with T = {x_TD.shape[0]}, got {tuple(expert_idx_TK.shape)}"
        )
    if expert_idx_TK.dtype != torch.int64:
        raise ValueError(f"permute: expert_idx_TK must be int64, got {expert_idx_TK.dtype}")
    if num_experts < 1:
        raise ValueError(f"permute: num_experts must be >= 1, got {num_experts}")
    if expert_idx_TK.numel():
        lo, hi = torch.aminmax(expert_idx_TK)
        if int(lo) < -1 or int(hi) >= num_experts:
            raise ValueError(
                f"permute: expert ids must lie in [0, {num_experts}) or be -1 (dropped); "
                f"got min {int(lo)}, max {int(hi)}"
            )


def check_grouped_mm_inputs(x_ND: Tensor, w_EDF: Tensor, tokens_per_expert_E: Tensor) -> list[int]:
    """Validate shapes and return the per-expert row counts as a Python list."""
    if x_ND.dim() != 2 or w_EDF.dim() != 3 or x_ND.shape[1] != w_EDF.shape[1]:
        raise ValueError(
            f"grouped_mm: need x_ND [N, D] and w_EDF [E, D, F]; got {tuple(x_ND.shape)} and {tuple(w_EDF.shape)}"
        )
    counts = [int(c) for c in tokens_per_expert_E.tolist()]
    if len(counts) != w_EDF.shape[0] or sum(counts) != x_ND.shape[0] or min(counts, default=0) < 0:
        raise ValueError(
            f"grouped_mm: tokens_per_expert_E must have E = {w_EDF.shape[0]} non-negative entries summing "
            f"to N = {x_ND.shape[0]}; got {counts}"
        )
    return counts


def check_unpermute_inputs(y_ND: Tensor, state: PermuteState, weights_TK: Tensor) -> None:
    if y_ND.dim() != 2 or y_ND.shape[0] != state.num_rows:
        raise ValueError(f"unpermute: y_ND must be [{state.num_rows}, D], got {tuple(y_ND.shape)}")
    if tuple(weights_TK.shape) != (state.num_tokens, state.topk):
        raise ValueError(
            f"unpermute: weights_TK must be [{state.num_tokens}, {state.topk}], got {tuple(weights_TK.shape)}"
        )


def accumulation_dtype(y_dtype: torch.dtype) -> torch.dtype:
    """Sum the K weighted copies in at least fp32: bf16 sums of K terms lose too many bits."""
    return torch.promote_types(y_dtype, torch.float32)
