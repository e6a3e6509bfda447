"""Tests for moe_kernels/: every implementation against a per-token loop written here, and fast vs
reference gradients.

Tolerances: fp32 results are compared with an fp64 per-token loop at rtol = atol = 1e-5. bf16
results are compared with the same fp64 loop run on the bf16-rounded inputs at rtol = atol = 3e-2:
the grouped GEMM rounds each expert output to bf16 (relative error about 2^-8) before the fp32
weighted sum, and the final cast rounds again.
"""
from __future__ import annotations

import pytest
import torch

import moe_kernels as kernels
from moe_kernels import fast as fast_mod

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
IMPLS = ["reference", "fast"]


def loop_moe(x_TD, idx_TK, weights_TK, w_EDF):
    """out[t] = sum_k weights[t, k] * (x[t] @ w[idx[t, k]]), skipping idx = -1; in fp64."""
    x, wts, w = x_TD.double(), weights_TK.double(), w_EDF.double()
    T, K = idx_TK.shape
    out = torch.zeros(T, w.shape[2], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(idx_TK[t, k])
            if e >= 0:
                out[t] += wts[t, k] * (x[t] @ w[e])
    return out


def make_case(case: str, dtype, D=16, F=8, E=6, K=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = 1 if case == "T1" else 9
    x = torch.randn(T, D, generator=gen).to(dtype)
    w = (torch.randn(E, D, F, generator=gen) / D**0.5).to(dtype)
    weights = torch.rand(T, K, generator=gen)
    if case in ("random", "T1", "unaligned"):
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    elif case == "zero_experts":
        # only experts 1 and 4 receive tokens; 0, 2, 3, 5 (including the first and last) get none
        idx = torch.tensor([[1, 4], [4, 1]]).repeat(T, 1)[:T]
    elif case == "one_expert":
        idx = torch.full((T, K), 3)
    elif case == "dropped":
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        idx[0, :] = -1
        idx[3, 1] = -1
        idx[T - 1, 0] = -1
    elif case == "all_dropped":
        idx = torch.full((T, K), -1)
    else:
        raise AssertionError(case)
    return x, idx.long(), weights, w


CASES = ["random", "zero_experts", "one_expert", "dropped", "all_dropped", "T1"]


def run_moe(k, x, idx, weights, w):
    x_ND, counts_E, state = k.permute(x, idx, w.shape[0])
    y_NF = k.grouped_mm(x_ND, w, counts_E)
    return k.unpermute(y_NF, state, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pipeline_matches_per_token_loop(impl, case, dtype):
    x, idx, weights, w = make_case(case, dtype)
    out = run_moe(kernels.get_kernels(impl), x, idx, weights, w)
    assert out.dtype == dtype and out.shape == (x.shape[0], w.shape[2])
    torch.testing.assert_close(out.double(), loop_moe(x, idx, weights, w), **TOL[dtype])
    if case == "all_dropped":
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_unaligned_dims_fp32(impl):
    # D = 6, F = 5 fp32 rows are not 16-byte multiples: fast must fall back, still correct.
    x, idx, weights, w = make_case("dropped", torch.float32, D=6, F=5)
    out = run_moe(kernels.get_kernels(impl), x, idx, weights, w)
    torch.testing.assert_close(out.double(), loop_moe(x, idx, weights, w), **TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
def test_permute_order_and_counts(impl):
    x, idx, _, w = make_case("dropped", torch.float32)
    E = w.shape[0]
    x_ND, counts_E, state = kernels.get_kernels(impl).permute(x, idx, E)
    T, K = idx.shape
    expected = sorted((int(idx[t, k]), t, k) for t in range(T) for k in range(K) if idx[t, k] >= 0)
    assert state.assignment_N.tolist() == [t * K + k for _, t, k in expected]
    assert torch.equal(x_ND, x[[t for _, t, _ in expected]])
    assert counts_E.dtype == torch.int64 and counts_E.shape == (E,)
    assert counts_E.tolist() == [sum(1 for e, _, _ in expected if e == j) for j in range(E)]


def _grads(impl, case, dtype, loss_kind, seed=0):
    x, idx, weights, w = make_case(case, dtype, seed=seed)
    x.requires_grad_(); w.requires_grad_(); weights.requires_grad_()
    out = run_moe(kernels.get_kernels(impl), x, idx, weights, w)
    if loss_kind == "sum":
        # .sum() hands backward a zero-stride gradient, which torch._grouped_mm's own backward rejects
        out.sum().backward()
    else:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.dtype)
        (out.float() * g.float()).sum().backward()
    return x.grad, w.grad, weights.grad


@pytest.mark.parametrize("loss_kind", ["sum", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["random", "zero_experts", "dropped", "T1"])
def test_fast_gradients_match_reference(case, dtype, loss_kind):
    ref = _grads("reference", case, dtype, loss_kind)
    fast = _grads("fast", case, dtype, loss_kind)
    for name, a, b in zip(("x", "w", "weights"), fast, ref):
        assert a is not None and b is not None, name
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", ["zero_experts", "dropped"])
def test_reference_gradients_match_fp64_loop(case):
    x, idx, weights, w = make_case(case, torch.float32)
    ref = _grads("reference", case, torch.float32, "sum")
    leaves = [t.double().requires_grad_() for t in (x, w, weights)]
    loop_moe(leaves[0], idx, leaves[2], leaves[1]).sum().backward()
    for a, leaf in zip(ref, leaves):
        torch.testing.assert_close(a.double(), leaf.grad, rtol=1e-5, atol=1e-5)
    if case == "zero_experts":
        # experts that receive no token get an exactly-zero weight gradient
        assert torch.count_nonzero(ref[1][[0, 2, 3, 5]]) == 0


def test_fast_uses_grouped_mm_when_aligned(monkeypatch):
    assert fast_mod.grouped_mm_works("cpu", torch.float32)
    assert fast_mod.grouped_mm_works("cpu", torch.bfloat16)
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    k = kernels.get_kernels("fast")
    x, idx, weights, w = make_case("random", torch.bfloat16)
    w.requires_grad_()
    run_moe(k, x, idx, weights, w).sum().backward()
    assert len(calls) == 2  # forward, and dw (x needs no grad)
    calls.clear()
    x, idx, weights, w = make_case("random", torch.float32, D=6, F=5)
    run_moe(k, x, idx, weights, w)
    assert calls == []


def test_unpermute_bf16_with_fp32_weights_keeps_dtypes():
    x, idx, weights, w = make_case("random", torch.bfloat16)
    weights.requires_grad_()
    for impl in IMPLS:
        k = kernels.get_kernels(impl)
        x_ND, counts, state = k.permute(x, idx, w.shape[0])
        out = k.unpermute(x_ND.requires_grad_(), state, weights)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert weights.grad.dtype == torch.float32 and x_ND.grad.dtype == torch.bfloat16
        weights.grad = None


def test_states_are_interchangeable():
    x, idx, weights, _ = make_case("dropped", torch.float32)
    ref, fast = kernels.get_kernels("reference"), kernels.get_kernels("fast")
    x_ND, _, state = ref.permute(x, idx, 6)
    torch.testing.assert_close(fast.unpermute(x_ND, state, weights), ref.unpermute(x_ND, state, weights))


def test_get_kernels_names_and_errors():
    with pytest.raises(ValueError, match="allowed: 'auto', 'reference', 'fast', 'npu'"):
        kernels.get_kernels("cutlass")
    with pytest.raises(ValueError, match="torch_npu"):
        kernels.get_kernels("npu")
    assert kernels.get_kernels("reference").name == "reference"
    assert kernels.get_kernels("fast").name == "fast"
    assert kernels.get_kernels("auto", "cpu").name == "fast"  # torch 2.13 CPU has a working _grouped_mm
    assert kernels.available_kernels() == ["reference", "fast"]
    for impl in IMPLS:
        assert isinstance(kernels.get_kernels(impl), kernels.MoEKernels)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_expert_ids_rejected(impl):
    x, idx, _, _ = make_case("random", torch.float32)
    k = kernels.get_kernels(impl)
    for bad in (6, -2):
        idx2 = idx.clone()
        idx2[2, 0] = bad
        with pytest.raises(ValueError, match="expert ids"):
            k.permute(x, idx2, 6)


def test_auto_falls_back_without_grouped_mm(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    fast_mod.grouped_mm_works.cache_clear()
    try:
        assert kernels.get_kernels("auto", "cpu").name == "reference"
        x, idx, weights, w = make_case("zero_experts", torch.bfloat16)
        out = run_moe(kernels.get_kernels("fast"), x, idx, weights, w)
        torch.testing.assert_close(out.double(), loop_moe(x, idx, weights, w), **TOL[torch.bfloat16])
    finally:
        fast_mod.grouped_mm_works.cache_clear()


def test_auto_on_unavailable_device_is_reference():
    # No torch_npu here: the probe cannot even allocate on 'npu', so auto must not pick fast.
    assert kernels.get_kernels("auto", "npu").name == "reference"


# The Ascend hook (moe_kernels/npu.py) is tested against a stand-in torch_npu in tests/test_kernels_npu.py.


# bf16 GEMM compute dtype: a CPU without a native bf16 GEMM (this AVX2 box) multiplies bf16 in fp32.
# Both settings are forced here so each path is tested wherever the suite runs.
@pytest.fixture(params=[False, True], ids=["bf16_as_fp32", "bf16_native"])
def native_bf16(request, monkeypatch):
    monkeypatch.setattr(fast_mod, "native_bf16_gemm", lambda device_type: request.param)
    return request.param


def test_gemm_compute_dtype(native_bf16):
    assert fast_mod.gemm_compute_dtype(torch.float32, "cpu") == torch.float32
    expected = torch.bfloat16 if native_bf16 else torch.float32
    assert fast_mod.gemm_compute_dtype(torch.bfloat16, "cpu") == expected


@pytest.mark.parametrize("case", CASES)
def test_fast_bf16_paths_match_per_token_loop(case, native_bf16):
    x, idx, weights, w = make_case(case, torch.bfloat16)
    out = run_moe(kernels.get_kernels("fast"), x, idx, weights, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), loop_moe(x, idx, weights, w), **TOL[torch.bfloat16])


@pytest.mark.parametrize("loss_kind", ["sum", "weighted"])
@pytest.mark.parametrize("case", ["random", "zero_experts", "one_expert", "dropped", "all_dropped", "T1"])
def test_fast_bf16_paths_gradients_match_reference(case, loss_kind, native_bf16):
    ref = _grads("reference", case, torch.bfloat16, loss_kind)
    fast = _grads("fast", case, torch.bfloat16, loss_kind)
    for name, a, b in zip(("x", "w", "weights"), fast, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **TOL[torch.bfloat16], msg=lambda m: f"grad {name}: {m}")


def test_bf16_gemm_runs_in_compute_dtype(monkeypatch, native_bf16):
    seen = []
    real = torch._grouped_mm

    def recording(*args, **kwargs):
        seen.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    x, idx, weights, w = make_case("random", torch.bfloat16)
    w.requires_grad_()
    x.requires_grad_()
    out = run_moe(kernels.get_kernels("fast"), x, idx, weights, w)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert len(seen) == 3  # forward, dx, dw
    assert set(seen) == {torch.bfloat16 if native_bf16 else torch.float32}


@pytest.mark.parametrize("case", ["zero_experts", "dropped"])
def test_fast_mixed_dtypes_bf16_x_fp32_w(case, native_bf16):
    # bf16 activations with fp32 (master) expert weights: output bf16, each gradient in its input's dtype.
    x, idx, weights, w = make_case(case, torch.bfloat16)
    w32 = w.float().requires_grad_()
    x.requires_grad_()
    k = kernels.get_kernels("fast")
    x_ND, counts_E, state = k.permute(x, idx, w32.shape[0])
    out = k.unpermute(k.grouped_mm(x_ND, w32, counts_E), state, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), loop_moe(x, idx, weights, w32), **TOL[torch.bfloat16])
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w32.grad.dtype == torch.float32
    ref = _grads("reference", case, torch.bfloat16, "sum")
    torch.testing.assert_close(w32.grad, ref[1].float(), **TOL[torch.bfloat16])
    torch.testing.assert_close(x.grad.float(), ref[0].float(), **TOL[torch.bfloat16])


def test_unpermute_weight_grad_without_drops_fully_written():
    # No dropped assignment: the weight gradient buffer is not zero-filled first, so every entry
    # must come from index_copy_ (compared with the reference, which zero-fills).
    x, idx, weights, _ = make_case("random", torch.float32)
    grads = []
    for impl in IMPLS:
        k = kernels.get_kernels(impl)
        wts = weights.clone().requires_grad_()
        x_ND, _, state = k.permute(x, idx, 6)
        k.unpermute(x_ND, state, wts).pow(2).sum().backward()
        grads.append(wts.grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0])
