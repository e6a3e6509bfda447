"""Benchmark: forward + backward of the routed-expert path with the fast kernels vs the reference
kernels, measured in the same run.

Default mode ("ffn") is self-contained and uses only moe_kernels/: permute -> grouped_mm (w1, w3) ->
SwiGLU -> grouped_mm (w2) -> unpermute, with skewed random routing (uneven expert loads, as in
training). `--layer` also times moe.layer.MoELayer built with each kernel set (router, shared
expert and aux losses included, so the kernel share of the time is smaller).

Reference and fast runs alternate within each repeat so that drift in a shared machine's load hits
both alike. Prints the median time of each and the ratio reference / fast (> 1 means fast wins).

    python bench/bench_moe_layer.py --repeats 20 --dtype both --threads 1 --stages --layer
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_kernels as kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_routing(T: int, E: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # A per-expert bias makes loads uneven (max/mean about 1.5x), like a not-yet-balanced router.
    logits_TE = torch.randn(T, E, generator=gen) + 0.35 * torch.randn(E, generator=gen)
    top_vals_TK, idx_TK = logits_TE.topk(K, dim=-1)
    return idx_TK, torch.softmax(top_vals_TK, dim=-1)


def ffn_step(k, x_TD, idx_TK, weights_TK, w1_EDF, w3_EDF, w2_EFD, grad_TD) -> None:
    x_ND, counts_E, state = k.permute(x_TD, idx_TK, w1_EDF.shape[0])
    h_NF = F.silu(k.grouped_mm(x_ND, w1_EDF, counts_E)) * k.grouped_mm(x_ND, w3_EDF, counts_E)
    out_TD = k.unpermute(k.grouped_mm(h_NF, w2_EFD, counts_E), state, weights_TK)
    (out_TD.float() * grad_TD).sum().backward()


def time_pair(step_ref, step_fast, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        step_ref()
        step_fast()
    t_ref, t_fast = [], []
    for _ in range(repeats):
        for step, times in ((step_ref, t_ref), (step_fast, t_fast)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return t_ref, t_fast


def make_inputs(args, dtype: torch.dtype, gen: torch.Generator):
    """Tokens, routing and the first expert stack, shared by the whole-FFN and per-stage timings."""
    T, D, E, K, Fd = args.tokens, args.hidden, args.experts, args.topk, args.ffn
    x_TD = torch.randn(T, D, generator=gen).to(dtype).requires_grad_()
    idx_TK, weights_TK = make_routing(T, E, K, gen)
    weights_TK.requires_grad_()
    w1 = (torch.randn(E, D, Fd, generator=gen) * 0.05).to(dtype).requires_grad_()
    return x_TD, idx_TK, weights_TK, w1


def bench_ffn(args, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    T, D, E, Fd = args.tokens, args.hidden, args.experts, args.ffn
    x_TD, idx_TK, weights_TK, w1 = make_inputs(args, dtype, gen)
    w3 = (torch.randn(E, D, Fd, generator=gen) * 0.05).to(dtype).requires_grad_()
    w2 = (torch.randn(E, Fd, D, generator=gen) * 0.05).to(dtype).requires_grad_()
    grad_TD = torch.randn(T, D, generator=gen)
    leaves = (x_TD, weights_TK, w1, w3, w2)

    def step(k):
        for t in leaves:
            t.grad = None
        ffn_step(k, x_TD, idx_TK, weights_TK, w1, w3, w2, grad_TD)

    ref, fast = kernels.get_kernels("reference"), kernels.get_kernels("fast")
    # Same numbers from both before timing anything (bf16: the GEMM rounding differs slightly).
    step(ref)
    grads_ref = [t.grad.float().clone() for t in leaves]
    step(fast)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for t, g in zip(leaves, grads_ref):
        err = (t.grad.float() - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert err < tol, f"fast and reference gradients differ (max rel err {err:.2e})"
    counts = torch.bincount(idx_TK.flatten(), minlength=E).float()
    load = f"max/mean expert load {counts.max().item() / counts.mean().item():.2f}"
    return time_pair(lambda: step(ref), lambda: step(fast), args.repeats, args.warmup), load


def bench_stages(args, dtype: torch.dtype):
    """Each stage alone, forward + backward, so the whole-FFN ratio can be attributed."""
    gen = torch.Generator().manual_seed(0)
    T, D, E, Fd = args.tokens, args.hidden, args.experts, args.ffn
    x_TD, idx_TK, weights_TK, w1 = make_inputs(args, dtype, gen)
    ref, fast = kernels.get_kernels("reference"), kernels.get_kernels("fast")
    x_ND, counts_E, state = fast.permute(x_TD.detach(), idx_TK, E)
    x_ND.requires_grad_()
    g_ND = torch.randn(x_ND.shape, generator=gen).to(dtype)
    g_NF = torch.randn(x_ND.shape[0], Fd, generator=gen).to(dtype)
    g_TD = torch.randn(T, D, generator=gen).to(dtype)

    def permute(k):
        x_TD.grad = None
        k.permute(x_TD, idx_TK, E)[0].backward(g_ND)

    def gemm(k):
        x_ND.grad = w1.grad = None
        k.grouped_mm(x_ND, w1, counts_E).backward(g_NF)

    def unpermute(k):
        x_ND.grad = weights_TK.grad = None
        k.unpermute(x_ND, state, weights_TK).backward(g_TD)

    out = []
    for label, fn in (("permute", permute), ("grouped_mm D->F", gemm), ("unpermute", unpermute)):
        out.append((label, time_pair(lambda: fn(ref), lambda: fn(fast), args.repeats, args.warmup)))
    return out


def bench_layer(args, dtype: torch.dtype):
    from moe.config import ModelConfig
    from moe.layer import MoELayer

    cfg = ModelConfig(hidden_size=args.hidden, num_experts=args.experts, top_k=args.topk,
                      expert_ffn_size=args.ffn)
    layers = {}
    for name in ("reference", "fast"):
        torch.manual_seed(0)
        layers[name] = MoELayer(cfg, kernels.get_kernels(name)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    B = 2
    x = torch.randn(B, args.tokens // B, args.hidden, generator=gen).to(dtype)
    grad = torch.randn(x.shape, generator=gen)

    def step(layer):
        layer.zero_grad(set_to_none=True)
        y, aux = layer(x)
        ((y.float() * grad).sum() + aux["aux_loss"]).backward()

    return time_pair(lambda: step(layers["reference"]), lambda: step(layers["fast"]), args.repeats, args.warmup), ""


def report(label: str, t_ref: list[float], t_fast: list[float], extra: str) -> None:
    m_ref, m_fast = statistics.median(t_ref), statistics.median(t_fast)
    print(f"{label:<22} reference {m_ref * 1e3:8.2f} ms   fast {m_fast * 1e3:8.2f} ms   "
          f"ratio ref/fast {m_ref / m_fast:5.2f}x   {extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed iterations per kernel set (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--layer", action="store_true", help="also time moe.layer.MoELayer with each kernel set")
    p.add_argument("--stages", action="store_true", help="also time permute, one grouped_mm, unpermute alone")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 gives steadier numbers on a shared box")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"auto kernels on cpu: {kernels.get_kernels('auto', 'cpu').name}")
    print(f"T={args.tokens} D={args.hidden} E={args.experts} K={args.topk} F={args.ffn}, "
          f"forward+backward, median of {args.repeats}")
    for name in dtypes:
        (t_ref, t_fast), extra = bench_ffn(args, DTYPES[name])
        report(f"expert FFN {name}", t_ref, t_fast, extra)
    if args.stages:
        for name in dtypes:
            for label, (t_ref, t_fast) in bench_stages(args, DTYPES[name]):
                report(f"{label} {name}", t_ref, t_fast, "(stage alone)")
    if args.layer:
        for name in dtypes:
            (t_ref, t_fast), extra = bench_layer(args, DTYPES[name])
            report(f"MoELayer {name}", t_ref, t_fast, "(router + shared expert included)")


if __name__ == "__main__":
    main()
