"""Optional Ascend hook: grouped GEMM through `torch_npu.npu_grouped_matmul`, everything else from fast.

Never required, never installed here (torch_npu without the CANN toolkit breaks `import torch`).
It is only looked for when asked (`get_kernels('npu')`, `get_kernels('auto', 'npu')`,
`available_kernels()`), and any failure to import it means "not available". The `npu` extra pins
torch-npu to the torch release it is built for (torch-npu 2.13.0.* requires torch 2.13.0.*).

Only modes documented for npu_grouped_matmul on Atlas A2/A3 are used (Ascend op-plugin
docs/context/torch_npu-npu_grouped_matmul.md: group_type -1 or 0, x never transposed, every last
dimension below 65536, at most 128 tensors in a list); not run on real hardware in this repo, but
tests/test_kernels_npu.py runs the glue against a stand-in that enforces that contract:
- forward y = gmm([x_ND], [w_EDF], group_list=cumsum(counts), group_type=0, group_list_type=0,
  split_item=3)[0]: one x, one 3-D weight, one y, groups along the rows of x. Cumulative counts
  (group_list_type=0), because counts (type 1) may not have length 1.
- backward dx: the same call with w transposed in its last two dims (allowed for weight).
- backward dw_e = x_e^T g_e: no documented mode groups the reduction axis, so one list call
  (group_type=-1, split_item=0) over the experts that got rows, with x_e^T as its own contiguous
  tensor, rows split below the 65536 inner limit; fp32 multi-tensor calls are not documented, so
  fp32 uses per-expert torch matmuls.
- one local expert (EP = experts): plain torch matmuls, no grouped call at all.
The GEMMs run in x's dtype (the op needs equal dtypes); each gradient comes back in its input's.
Permute and unpermute stay on the portable torch path of `FastKernels`; torch_npu's
npu_moe_token_permute has no notion of dropped (-1) assignments.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch
from torch import Tensor

from .base import check_grouped_mm_inputs
from .fast import FastKernels


def import_torch_npu() -> ModuleType | None:
    """torch_npu if it imports here, else None (any failure to import it means "not available"). The
    one place the project looks for it: kernels and `parallel/device.py` both ask here."""
    mod = sys.modules.get("torch_npu")
    if mod is None:
        try:
            if importlib.util.find_spec("torch_npu") is None:
                return None
            mod = importlib.import_module("torch_npu")  # registers torch.npu
        except Exception:
            return None
    return mod


def load_torch_npu() -> ModuleType | None:
    """Return torch_npu if it is importable and has npu_grouped_matmul, else None."""
    mod = import_torch_npu()
    return mod if callable(getattr(mod, "npu_grouped_matmul", None)) else None


INNER_LIMIT = 65536  # every x and weight last dimension must stay below this
MAX_TENSORS = 128  # longest tensor list the op takes


class _NpuGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, counts: list[int], torch_npu: ModuleType) -> Tensor:
        w = w_EDF.to(x_ND.dtype)
        ctx.save_for_backward(x_ND, w)
        ctx.counts, ctx.torch_npu, ctx.w_dtype = counts, torch_npu, w_EDF.dtype
        return _rows_grouped(torch_npu, x_ND, w, counts)

    @staticmethod
    def backward(ctx, grad_NF: Tensor):
        x_ND, w = ctx.saved_tensors
        grad_NF = grad_NF.contiguous().to(x_ND.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _rows_grouped(ctx.torch_npu, grad_NF, w.transpose(1, 2), ctx.counts)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(ctx.torch_npu, x_ND, grad_NF, ctx.counts).to(ctx.w_dtype)
        return grad_x, grad_w, None, None


def _rows_grouped(torch_npu: ModuleType, x_ND: Tensor, w_EDF: Tensor, counts: list[int]) -> Tensor:
    """y[rows of e] = x[rows of e] @ w[e] in one call (group_type 0: groups along the rows)."""
    cumsum = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(x_ND.device)
    return torch_npu.npu_grouped_matmul([x_ND], [w_EDF], group_list=cumsum, split_item=3, group_type=0,
                                        group_list_type=0)[0]


def _weight_grad(torch_npu: ModuleType, x_ND: Tensor, g_NF: Tensor, counts: list[int]) -> Tensor:
    """dw[e] = x_e^T @ g_e, as independent matmuls (group_type -1) over pieces of below-limit rows."""
    pieces, start = [], 0  # (expert, first row, end row)
    for e, n in enumerate(counts):
        pieces += [(e, r, min(r + INNER_LIMIT - 1, start + n)) for r in range(start, start + n, INNER_LIMIT - 1)]
        start += n
    split = len(pieces) > sum(1 for n in counts if n)  # some expert's pieces are summed: do it in fp32
    grad_w = x_ND.new_zeros(len(counts), x_ND.shape[1], g_NF.shape[1], dtype=torch.float32 if split else None)
    if x_ND.dtype == torch.float32:  # fp32 is documented for single-tensor calls only
        for e, r0, r1 in pieces:
            grad_w[e] += x_ND[r0:r1].t() @ g_NF[r0:r1]
        return grad_w
    for i in range(0, len(pieces), MAX_TENSORS):
        chunk = pieces[i:i + MAX_TENSORS]
        outs = torch_npu.npu_grouped_matmul([x_ND[r0:r1].t().contiguous() for _, r0, r1 in chunk],
                                            [g_NF[r0:r1] for _, r0, r1 in chunk], split_item=0, group_type=-1)
        for (e, _, _), out in zip(chunk, outs):
            grad_w[e] += out
    return grad_w


class NpuKernels(FastKernels):
    name = "npu"

    def __init__(self, torch_npu: ModuleType | None = None):
        self._torch_npu = torch_npu or load_torch_npu()
        if self._torch_npu is None:
            raise RuntimeError("NpuKernels needs torch_npu with npu_grouped_matmul, which is not importable here")

    def grouped_mm(self, x_ND: Tensor, w_EDF: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        counts = check_grouped_mm_inputs(x_ND, w_EDF, tokens_per_expert_E)
        if w_EDF.shape[0] == 1 or x_ND.shape[0] == 0:  # one local expert, or no rows: no grouping needed
            return x_ND @ w_EDF[0].to(x_ND.dtype)
        return _NpuGroupedMM.apply(x_ND.contiguous(), w_EDF, counts, self._torch_npu)
