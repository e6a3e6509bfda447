"""The Ascend hook (moe_kernels/npu.py) on CPU, against a stand-in torch_npu whose npu_grouped_matmul
computes what the Ascend op-plugin documentation (docs/context/torch_npu-npu_grouped_matmul.md)
says and rejects every call outside the documented Atlas A2/A3 modes: group_type -1 or 0 only, x
never transposed, counts (group_list_type 1) never of length 1, last dimensions below 65536, at
most 128 tensors per list, fp32 only with single tensors, equal x and weight dtypes."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import moe_kernels as kernels
from moe_kernels import npu as npu_mod
from test_kernels import TOL, _grads, loop_moe, make_case, run_moe


def _contiguous_or_transposed(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.transpose(-1, -2).is_contiguous()


def fake_npu_grouped_matmul(x, weight, *, bias=None, group_list=None, split_item=0, group_type=None,
                            group_list_type=0, **unsupported):
    assert not unsupported and bias is None, f"unexpected arguments {sorted(unsupported)}"
    assert all(t.is_contiguous() for t in x), "x must not be transposed"
    assert len({t.dtype for t in [*x, *weight]}) == 1, "x and weight dtypes must match"
    inner = [t.shape[-1] if t.is_contiguous() else t.shape[-2] for t in [*x, *weight]]  # the stored last dim
    assert max(inner) < npu_mod.INNER_LIMIT, "a last dimension over the inner limit"
    if group_type == -1:  # 多多多: independent matmuls, one output per weight
        assert group_list is None and split_item in (0, 1) and len(x) == len(weight) <= 128
        assert all(a.dim() == b.dim() == 2 for a, b in zip(x, weight)) and x[0].dtype != torch.float32
        return [a @ b for a, b in zip(x, weight)]
    assert group_type == 0, f"group_type={group_type} is not documented for Atlas A2/A3"
    assert len(x) == 1 and x[0].dim() == 2 and split_item in (2, 3), "groups along rows: one 2-D x, one y"
    assert len(weight) == 1 and weight[0].dim() == 3 and _contiguous_or_transposed(weight[0])
    assert isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1
    w = weight[0]
    assert group_list.numel() == w.shape[0] <= 1024
    if group_list_type == 0:  # cumulative
        assert bool((group_list >= 0).all()) and bool((group_list.diff() >= 0).all())
        assert int(group_list[-1]) == x[0].shape[0]
        counts = torch.diff(group_list, prepend=group_list.new_zeros(1)).tolist()
    else:
        assert group_list_type == 1, "group_list_type 2 is for int8 only"
        assert group_list.numel() != 1, "counts (group_list_type 1) cannot have length 1"
        assert int(group_list.sum()) == x[0].shape[0]
        counts = group_list.tolist()
    return [torch.cat([xe @ w[e] for e, xe in enumerate(x[0].split(counts))])]


@pytest.fixture
def npu(monkeypatch):
    fake = types.ModuleType("torch_npu")
    fake.npu_grouped_matmul = fake_npu_grouped_matmul
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return kernels.get_kernels("npu")


def _reference_grads(x, w, counts, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = kernels.get_kernels("reference").grouped_mm(x, w, counts)
    (y.float() * g.float()).sum().backward()
    return y, x.grad, w.grad


LAYOUTS = {  # rows per local expert
    "one-local-expert": [7],
    "two-experts": [3, 4],
    "empty-first-and-last": [0, 5, 0, 2, 0],
    "all-rows-in-one": [0, 0, 9, 0],
    "no-rows": [0, 0, 0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_grouped_mm_and_gradients_match_reference(npu, layout, dtype):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor(LAYOUTS[layout])
    x = torch.randn(int(counts.sum()), 16, generator=gen).to(dtype)
    w = (torch.randn(len(counts), 16, 8, generator=gen) / 4).to(dtype)
    g = torch.randn(x.shape[0], 8, generator=gen).to(dtype)
    want_y, want_dx, want_dw = _reference_grads(x, w, counts, g)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = npu.grouped_mm(xl, wl, counts)
    (y.float() * g.float()).sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(xl.grad, want_dx, **tol)
    torch.testing.assert_close(wl.grad, want_dw, **tol)
    assert y.dtype == xl.grad.dtype == wl.grad.dtype == dtype


def test_weight_grad_splits_long_experts_and_long_lists(npu, monkeypatch):
    # an expert with more rows than the inner limit, and more pieces than one list holds
    monkeypatch.setattr(npu_mod, "INNER_LIMIT", 4)
    monkeypatch.setattr(npu_mod, "MAX_TENSORS", 2)
    calls = []
    monkeypatch.setattr(sys.modules["torch_npu"], "npu_grouped_matmul",
                        lambda *a, **k: calls.append(k.get("group_type")) or fake_npu_grouped_matmul(*a, **k))
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([10, 0, 3])
    x = torch.randn(13, 3, generator=gen).to(torch.bfloat16)  # inner dims 3 and 2: below the patched limit
    w = torch.randn(3, 3, 2, generator=gen).to(torch.bfloat16)
    g = torch.randn(13, 2, generator=gen).to(torch.bfloat16)
    _, _, want_dw = _reference_grads(x, w, counts, g)
    wl = w.clone().requires_grad_()
    (npu.grouped_mm(x, wl, counts).float() * g.float()).sum().backward()
    torch.testing.assert_close(wl.grad, want_dw, **TOL[torch.bfloat16])
    assert calls.count(-1) == 3  # pieces of 3+3+3+1 rows and 3 rows, two per call


def test_bf16_activations_with_fp32_weights(npu):
    x, idx, weights, w = make_case("zero_experts", torch.bfloat16)
    w32 = w.float().requires_grad_()
    out = run_moe(npu, x, idx, weights, w32)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    torch.testing.assert_close(w32.grad, _grads("reference", "zero_experts", torch.bfloat16, "sum")[1].float(),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("case", ["zero_experts", "dropped", "one_expert"])
def test_moe_pipeline_with_stand_in_module(npu, case):
    assert "npu" in kernels.available_kernels() and kernels.get_kernels("auto", "npu").name == "npu"
    x, idx, weights, w = make_case(case, torch.float32)
    torch.testing.assert_close(run_moe(npu, x, idx, weights, w).double(), loop_moe(x, idx, weights, w),
                               **TOL[torch.float32])
    leaves = [t.clone().requires_grad_() for t in (x, w, weights)]
    run_moe(npu, leaves[0], idx, leaves[2], leaves[1]).sum().backward()
    for want, leaf in zip(_grads("reference", case, torch.float32, "sum"), leaves):
        torch.testing.assert_close(leaf.grad, want)
