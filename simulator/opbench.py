"""Operator microbenchmarks for calibration: the project's own operators, forward + backward.

The cost model charges element-wise work by kind (`compute._ELTWISE`). On a device with fused
kernels a bytes-and-launches rule is enough; on the CPU reference path each kind is a handful of
small ATen ops plus autograd bookkeeping, and only measuring the real implementation tells what it
costs. Each benchmark here runs one kind as the model runs it (same modules and kernels) at three
sizes and fits time = fixed + per_element * elements, where "elements" means what `compute.py`
passes for that kind. The GEMMs run through `F.linear` (as `nn.Linear` does) so their fit includes
the data- and weight-gradient GEMMs, and core attention through causal `scaled_dot_product_attention`.

Timing: each measurement is the mean per call over a batch of calls lasting at least `min_s` (about
a training step's length, so a batch is as exposed to other jobs as a step is), the fastest of
three batches. With one torch thread the clock is this thread's CPU time. On a shared
machine other jobs only ever add time (lost time slices, a busy sibling hyperthread, evicted
caches), so the fastest observation is the repeatable one. The optimizer step is the exception
(`timed_cold`): it is timed right after evicting the caches, as the trainer meets it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def clock() -> Callable[[], float]:
    """Thread CPU time when ATen runs on this thread alone, else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def timed(fn: Callable[[], object], min_s: float = 0.1, batches: int = 3) -> float:
    now = clock()
    fn()
    means = []
    for _ in range(batches):
        n, t0 = 0, now()
        while True:
            fn()
            n += 1
            el = now() - t0
            if el >= min_s:
                break
        means.append(el / n)
    return min(means)


def _fwd_bwd(make: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run():
        out = make()
        out.backward(torch.ones_like(out))
    return run


def linear_fwd_bwd(m: int, k: int, n: int) -> float:
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    return timed(_fwd_bwd(lambda: F.linear(x, w)))


def attention_fwd_bwd(b: int, h: int, s: int, d_qk: int, d_v: int) -> float:
    q = torch.randn(b, h, s, d_qk, requires_grad=True)
    k = torch.randn(b, h, s, d_qk, requires_grad=True)
    v = torch.randn(b, h, s, d_v, requires_grad=True)
    return timed(_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))


def _eltwise_benchmarks() -> dict[str, Callable[[int], tuple[Callable[[], None], int]]]:
    """kind -> builder(tokens) returning (fwd+bwd closure, elements as compute.py counts them).
    A table of ten small builders (about 70 lines), kept in one place so the shapes read side by side."""
    from moe_kernels import get_kernels
    from moe.config import ModelConfig
    from moe.layers import RMSNorm, RotaryEmbedding
    from moe.router import Router

    D, F_, E, K, V, H, R = 256, 512, 8, 2, 256, 4, 16
    kern = get_kernels("auto", device_type="cpu")

    def norm(T):
        mod, x = RMSNorm(D), torch.randn(T, D, requires_grad=True)
        return _fwd_bwd(lambda: mod(x)), T * D

    def residual(T):
        a, b = torch.randn(T, D, requires_grad=True), torch.randn(T, D, requires_grad=True)
        return _fwd_bwd(lambda: a + b), T * D

    def swiglu_act(T):
        a, b = torch.randn(T, F_, requires_grad=True), torch.randn(T, F_, requires_grad=True)
        return _fwd_bwd(lambda: F.silu(a) * b), T * F_

    def rope(T):
        mod = RotaryEmbedding(R, T, 10000.0)
        q, k = torch.randn(1, T, H, R, requires_grad=True), torch.randn(1, T, 1, R, requires_grad=True)
        return _fwd_bwd(lambda: mod(q).sum() + mod(k).sum()), T * (H + 1) * R

    def attn_reshape(T):  # MLA: split the projections, concatenate nope and rope parts, transpose
        qa, ka = torch.randn(1, T, H, 48, requires_grad=True), torch.randn(1, T, H, 48, requires_grad=True)

        def run():
            q = torch.cat(qa.split([32, 16], -1), -1).transpose(1, 2)
            k = torch.cat(ka.split([32, 16], -1), -1).transpose(1, 2)
            return (q.sum() + k.sum())
        return _fwd_bwd(run), 2 * T * H * 48

    def router(T):
        cfg = ModelConfig(hidden_size=D, num_experts=E, top_k=K)
        mod, x = Router(cfg), torch.randn(T, D, requires_grad=True)

        def run():
            r = mod(x, seq_len=T)
            return r.weights_TK.sum() + r.aux_loss
        return _fwd_bwd(run), T * E

    def permute(T):
        x = torch.randn(T, D, requires_grad=True)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        return _fwd_bwd(lambda: kern.permute(x, idx, E)[0]), T * K * D

    def unpermute(T):
        x = torch.randn(T, D)
        idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        rows, _, state = kern.permute(x, idx, E)
        y = rows.clone().requires_grad_(True)
        w = torch.rand(T, K, requires_grad=True)
        return _fwd_bwd(lambda: kern.unpermute(y, state, w)), T * K * D

    def cross_entropy(T):
        logits = torch.randn(T, V, requires_grad=True)
        labels = torch.randint(0, V, (T,))
        return _fwd_bwd(lambda: F.cross_entropy(logits.float(), labels)), T * V

    def embedding(T):
        emb = torch.nn.Embedding(V, D)
        tok = torch.randint(0, V, (T,))
        return _fwd_bwd(lambda: emb(tok)), T * D

    return {"norm": norm, "residual": residual, "swiglu_act": swiglu_act, "rope": rope,
            "attn_reshape": attn_reshape, "router": router, "permute": permute, "unpermute": unpermute,
            "cross_entropy": cross_entropy, "embedding": embedding}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points, both clipped to >= 0."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / sxx) if sxx else 0.0
    return max(0.0, my - slope * mx), slope


def fit_two(rows: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Least-squares (a, b) of y = a * x1 + b * x2 over (x1, x2, y) rows, no intercept (scale each
    row by 1 / y beforehand to fit the relative error); None when the two columns are (nearly)
    proportional, so that no fit separates them."""
    s11 = sum(x1 * x1 for x1, _, _ in rows)
    s12 = sum(x1 * x2 for x1, x2, _ in rows)
    s22 = sum(x2 * x2 for _, x2, _ in rows)
    s1y = sum(x1 * y for x1, _, y in rows)
    s2y = sum(x2 * y for _, x2, y in rows)
    det = s11 * s22 - s12 * s12
    if det <= 1e-12 * s11 * s22:
        return None
    return (s1y * s22 - s2y * s12) / det, (s11 * s2y - s12 * s1y) / det


def eltwise_costs(tokens=(64, 512, 2048), router_gemm: Callable[[int], float] = lambda T: 0.0) -> dict[str, list[float]]:
    """kind -> [fixed microseconds, nanoseconds per element], forward + backward together.
    `router_gemm(T)` is the modelled time of the router's own GEMM, which the cost model charges
    separately and is therefore taken out of the routing measurement."""
    out = {}
    for kind, build in _eltwise_benchmarks().items():
        pts = []
        for T in tokens:
            fn, elems = build(T)
            t = timed(fn)
            if kind == "router":
                t = max(0.0, t - router_gemm(T))
            pts.append((elems, t))
        fixed, slope = fit_line(pts)
        out[kind] = [fixed * 1e6, slope * 1e9]
    return out


def timed_cold(fn: Callable[[], object], reps: int = 7, evict_mb: int = 512) -> float:
    """Median seconds of `fn` right after writing `evict_mb` of other memory (outside the timing), as
    the optimizer runs right after a backward pass has streamed through the activations: warm
    repeats of the same step find its states in cache (this machine's L3 held hundreds of MB) and
    ran 25 % faster than the trainer's optimizer step."""
    now = clock()
    evict = torch.empty(evict_mb * 2**18)
    fn()
    times = []
    for _ in range(reps):
        evict.fill_(1.0)
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def optimizer_cost(shapes=((16, 2**14), (16, 2**18), (96, 2**14))) -> list[float]:
    """[microseconds per tensor, nanoseconds per parameter] of gradient clipping + a fused AdamW step,
    as the trainer runs them: cold, at sizes up to 4M parameters."""
    rows = []
    for n, size in shapes:
        ps = [torch.nn.Parameter(torch.randn(size)) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn(size)
        fused = {"fused": True}
        try:
            opt = torch.optim.AdamW(ps, lr=1e-3, **fused)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(ps, lr=1e-3)

        def step():
            torch.nn.utils.clip_grad_norm_(ps, 1.0)
            opt.step()
        rows.append((n, n * size, timed_cold(step)))
    a, b = fit_two(rows)  # t = a * tensors + b * params
    a, b = max(0.0, a), max(0.0, b)
    return [a * 1e6, b * 1e9]
