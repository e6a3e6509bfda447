"""Optional Ascend hook: grouped GEMM through `torch_npu.npu_grouped_matmul`, everything else from fast.

Never required, never installed here (torch_npu without the CANN toolkit breaks `import torch`).
It is only looked for when asked (`get_kernels('npu')`, `get_kernels('auto', 'npu')`,
`available_kernels()`), and any failure to import it means "not available".

Calling convention used (as in public Ascend MoE code; not run on real hardware in this repo, but
the glue is tested on CPU against a stand-in module implementing these semantics):
- forward  y  = npu_grouped_matmul([x_ND], [w_EDF], group_list=counts_E, split_item=2, group_type=0,
  group_list_type=1)[0]   (group_type=0: groups split the M/row axis; group_list_type=1: counts, not cumsum)
- backward dx = same call with w^T; dw = npu_grouped_matmul([x_ND^T], [grad_NF], group_type=2,
  split_item=3, ...)[0]  (group_type=2: groups split the reduction axis, giving [E, D, F]).
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


class _NpuGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, counts_E: Tensor, torch_npu: ModuleType) -> Tensor:
        ctx.save_for_backward(x_ND, w_EDF, counts_E)
        ctx.torch_npu = torch_npu
        return torch_npu.npu_grouped_matmul(
            [x_ND], [w_EDF], group_list=counts_E, split_item=2, group_type=0, group_list_type=1
        )[0]

    @staticmethod
    def backward(ctx, grad_NF: Tensor):
        x_ND, w_EDF, counts_E = ctx.saved_tensors
        gmm = ctx.torch_npu.npu_grouped_matmul
        grad_NF = grad_NF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = gmm(
                [grad_NF], [w_EDF.transpose(1, 2).contiguous()], group_list=counts_E,
                split_item=2, group_type=0, group_list_type=1,
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = gmm(
                [x_ND.t()], [grad_NF], group_list=counts_E, split_item=3, group_type=2, group_list_type=1
            )[0].contiguous()
        return grad_x, grad_w, None, None


class NpuKernels(FastKernels):
    name = "npu"

    def __init__(self, torch_npu: ModuleType | None = None):
        self._torch_npu = torch_npu or load_torch_npu()
        if self._torch_npu is None:
            raise RuntimeError("NpuKernels needs torch_npu with npu_grouped_matmul, which is not importable here")

    def grouped_mm(self, x_ND: Tensor, w_EDF: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        check_grouped_mm_inputs(x_ND, w_EDF, tokens_per_expert_E)
        counts_E = tokens_per_expert_E.to(device=x_ND.device, dtype=torch.int64)
        return _NpuGroupedMM.apply(x_ND.contiguous(), w_EDF, counts_E, self._torch_npu)
