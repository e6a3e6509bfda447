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

bf16 operands on a CPU without a native bf16 GEMM (no AVX512-BF16 / AMX, detected through
oneDNN's own check) are multiplied in fp32 and rounded back (`gemm_compute_dtype`): torch's bf16
GEMM there is a scalar loop, measured at 1-16 GFLOP/s against 110-176 GFLOP/s for fp32 on a 2-core
AVX2 EPYC, so the bf16 MoE layer was 4x slower than fp32 with it. The numbers are those of a bf16
GEMM with fp32 accumulation. Operands may also come in mixed (bf16 x, fp32 w): they are cast to the
compute dtype, the output has x's dtype and each gradient its input's dtype.

Measured and not adopted (2-core AVX2 CPU, fp32, D = 512, F = 256, 16 experts, MoELayer fwd+bwd):
one bmm over zero-padded [E, max rows, D] blocks instead of torch._grouped_mm. Alone it was 1.7x
faster at 32 balanced rows per expert, but in the layer, with padding, the pack/unpack copies and
their fresh memory, it tied at 32 rows per expert (27.9 vs 27.5 ms) and lost from 64 up (61 vs 56 ms
at 128, 210 vs 186 ms at 512).
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


@functools.lru_cache(maxsize=None)
def native_bf16_gemm(device_type: str) -> bool:
    """False on a CPU whose torch has no fast bf16 GEMM (no AVX512-BF16 / AMX: oneDNN's bf16 check
    fails and torch falls back to a scalar loop, 10-100x slower than its fp32 GEMM on the same
    core). Non-CPU devices are assumed to have one."""
    if device_type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def gemm_compute_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the expert GEMMs run in. bf16 operands on a CPU without a native bf16 GEMM are
    multiplied in fp32 and the result rounded back: the same numbers a bf16 GEMM with fp32
    accumulation gives (up to summation order), at fp32 GEMM speed."""
    if dtype == torch.bfloat16 and not native_bf16_gemm(device_type):
        return torch.float32
    return dtype


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
        out_dtype = x_ND.dtype
        compute_dtype = gemm_compute_dtype(out_dtype, x_ND.device.type)
        # No-ops unless bf16 must run as fp32 here; autograd casts the gradients back.
        x_ND = x_ND.contiguous().to(compute_dtype)
        w_EDF = w_EDF.to(compute_dtype)
        if can_use_grouped_mm(x_ND, w_EDF):
            offs_E = torch.cumsum(tokens_per_expert_E.to(x_ND.device), 0).to(torch.int32)
            y_NF = _GroupedMM.apply(x_ND, w_EDF, offs_E)
        else:
            y_NF = loop_grouped_mm(x_ND, w_EDF, counts)
        return y_NF.to(out_dtype)

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
            numel = ctx.weights_shape.numel()
            # Without dropped assignments index_copy_ writes every element: no zero-fill needed.
            grad_w = dot_N.new_empty(numel) if dot_N.numel() == numel else dot_N.new_zeros(numel)
            grad_w.index_copy_(0, assignment_N, dot_N)
            grad_w = grad_w.view(ctx.weights_shape).to(ctx.weights_dtype)
        if ctx.needs_input_grad[0]:
            grad_y = grad_rows_ND.mul_(w_N.unsqueeze(1)).to(y_ND.dtype)
        return grad_y, grad_w, None, None, None
