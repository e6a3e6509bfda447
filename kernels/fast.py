"""Fast MoE kernels: sort-based permute, `torch._grouped_mm` GEMM, index_add unpermute with a
hand-written backward.

`torch._grouped_mm` is a private op (torch >= 2.8 or so; this project pins 2.13). Facts measured on
CPU with torch 2.13.0, which decide when it is used:
- Every non-unit stride of every operand and of the output must be a multiple of 16 bytes, i.e. D and
  F must be multiples of 4 in fp32 and of 8 in bf16/fp16; otherwise it raises "strides should be
  multiple of 16 bytes". The offsets themselves (group boundaries) need no alignment, empty groups
  are fine, N = 0 is fine, and a data pointer off 16-byte alignment was accepted.
- Offsets are int32 cumulative row ends; rows past offs[-1] are left uninitialised, so offs[-1] must
  be N (enforced by the input check).
- Its built-in backward rejects gradients with zero strides (what `y.sum().backward()` produces), so
  we wrap it in `_GroupedMM`, whose backward makes the gradient contiguous and computes dx with a
  grouped GEMM against w^T and dw with the 2-D x 2-D form (offsets along the reduction dimension).
Where the op is missing, fails a probe for the device/dtype, or the strides are not aligned, the
GEMM falls back to a per-expert loop of `mm` (same results; one op per expert instead of one in all).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .base import (
    PermuteState,
    accumulation_dtype,
    check_grouped_mm_inputs,
    check_permute_inputs,
    check_unpermute_inputs,
)

_STRIDE_ALIGN_BYTES = 16


def has_grouped_mm_op() -> bool:
    return callable(getattr(torch, "_grouped_mm", None))


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_ND, w_EDF, offs_E)
        return torch._grouped_mm(x_ND, w_EDF, offs=offs_E)

    @staticmethod
    def backward(ctx, grad_NF: Tensor):
        x_ND, w_EDF, offs_E = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_NF, w_EDF.transpose(1, 2), offs=offs_E)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x_ND.t(), grad_NF, offs=offs_E)
        return grad_x, grad_w, None


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Run `_GroupedMM` forward and backward once on a tiny exact problem and check the numbers.

    Integer-valued inputs make every product and sum exact in bf16 too, so any mismatch means the op
    is broken or unsupported here, not rounding.
    """
    if not has_grouped_mm_op():
        return False
    try:
        device = torch.device(device_type)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(-2, 3, (5, 8), generator=gen).to(device=device, dtype=dtype).requires_grad_()
        w = torch.randint(-2, 3, (3, 8, 8), generator=gen).to(device=device, dtype=dtype).requires_grad_()
        offs = torch.tensor([2, 2, 5], dtype=torch.int32, device=device)
        y = _GroupedMM.apply(x, w, offs)
        y.sum().backward()
        xf, wf = x.detach().double().cpu(), w.detach().double().cpu()
        y_ref = torch.cat([xf[:2] @ wf[0], xf[2:] @ wf[2]])
        gx_ref = torch.cat([wf[0].sum(1).expand(2, 8), wf[2].sum(1).expand(3, 8)])
        gw_ref = torch.stack([xf[:2].sum(0)[:, None].expand(8, 8), torch.zeros(8, 8), xf[2:].sum(0)[:, None].expand(8, 8)])
        return (
            torch.equal(y.detach().double().cpu(), y_ref)
            and torch.equal(x.grad.double().cpu(), gx_ref)
            and torch.equal(w.grad.double().cpu(), gw_ref)
        )
    except Exception:
        return False


def _strides_aligned(t: Tensor) -> bool:
    size = t.element_size()
    return all(s == 1 or (s * size) % _STRIDE_ALIGN_BYTES == 0 for s in t.stride())


def can_use_grouped_mm(x_ND: Tensor, w_EDF: Tensor) -> bool:
    """True when `_GroupedMM` will accept these operands (x assumed contiguous)."""
    out_row_bytes = w_EDF.shape[2] * w_EDF.element_size()
    return (
        x_ND.dtype == w_EDF.dtype
        and x_ND.device == w_EDF.device
        and out_row_bytes % _STRIDE_ALIGN_BYTES == 0
        and _strides_aligned(x_ND)
        and _strides_aligned(w_EDF)
        and grouped_mm_works(x_ND.device.type, x_ND.dtype)
    )


def loop_grouped_mm(x_ND: Tensor, w_EDF: Tensor, counts: list[int]) -> Tensor:
    return torch.cat([x_e @ w_EDF[e] for e, x_e in enumerate(torch.split(x_ND, counts))])


class FastKernels:
    name = "fast"

    def permute(self, x_TD: Tensor, expert_idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, PermuteState]:
        check_permute_inputs(x_TD, expert_idx_TK, num_experts)
        T, K = expert_idx_TK.shape
        flat_A = expert_idx_TK.reshape(-1)
        # Slot 0 counts the dropped (-1) entries; they sort first, so slicing them off is free.
        counts = torch.bincount(flat_A + 1, minlength=num_experts + 1).cpu()
        num_dropped = int(counts[0])
        assignment_N = torch.sort(flat_A, stable=True).indices[num_dropped:]
        token_N = assignment_N // K
        tokens_per_expert_E = counts[1:].clone()
        state = PermuteState(assignment_N, token_N, tokens_per_expert_E, T, K)
        return x_TD.index_select(0, token_N), tokens_per_expert_E, state

    def grouped_mm(self, x_ND: Tensor, w_EDF: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        counts = check_grouped_mm_inputs(x_ND, w_EDF, tokens_per_expert_E)
        x_ND = x_ND.contiguous()
        if can_use_grouped_mm(x_ND, w_EDF):
            offs_E = torch.cumsum(tokens_per_expert_E.to(x_ND.device), 0).to(torch.int32)
            return _GroupedMM.apply(x_ND, w_EDF, offs_E)
        return loop_grouped_mm(x_ND, w_EDF, counts)

    def unpermute(self, y_ND: Tensor, state: PermuteState, weights_TK: Tensor) -> Tensor:
        check_unpermute_inputs(y_ND, state, weights_TK)
        return _WeightedUnpermute.apply(y_ND, weights_TK, state.token_N, state.assignment_N, state.num_tokens)


class _WeightedUnpermute(torch.autograd.Function):
    """out_TD = index_add over rows of y_ND * w_N, with a hand-written backward.

    Written by hand because on CPU each fresh [N, D] tensor costs about as much as the arithmetic
    on it (glibc returns large blocks to the OS, so every new one page-faults): the autograd
    composition of gather, mul and index_add makes four [N, D] temporaries, this makes two, and the
    weight gradient is a batched row dot product instead of mul + sum.
    """

    @staticmethod
    def forward(ctx, y_ND: Tensor, weights_TK: Tensor, token_N: Tensor, assignment_N: Tensor, num_tokens: int):
        acc = accumulation_dtype(y_ND.dtype)
        w_N = weights_TK.reshape(-1).index_select(0, assignment_N).to(acc)
        rows_ND = y_ND.to(acc, copy=True).mul_(w_N.unsqueeze(1))
        out_TD = rows_ND.new_zeros(num_tokens, y_ND.shape[1]).index_add_(0, token_N, rows_ND)
        ctx.save_for_backward(y_ND, w_N, token_N, assignment_N)
        ctx.weights_shape, ctx.weights_dtype = weights_TK.shape, weights_TK.dtype
        return out_TD.to(y_ND.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD: Tensor):
        y_ND, w_N, token_N, assignment_N = ctx.saved_tensors
        grad_rows_ND = grad_TD.to(w_N.dtype).index_select(0, token_N)
        grad_y = grad_w = None
        if ctx.needs_input_grad[1]:
            dot_N = torch.bmm(grad_rows_ND.unsqueeze(1), y_ND.to(w_N.dtype).unsqueeze(2)).view(-1)
            grad_w = dot_N.new_zeros(ctx.weights_shape.numel()).index_copy_(0, assignment_N, dot_N)
            grad_w = grad_w.view(ctx.weights_shape).to(ctx.weights_dtype)
        if ctx.needs_input_grad[0]:
            grad_y = grad_rows_ND.mul_(w_N.unsqueeze(1)).to(y_ND.dtype)
        return grad_y, grad_w, None, None, None
