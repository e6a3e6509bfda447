"""Benchmark: our MoE block (moe.layer.MoELayer, fast kernels) against peers' MoE blocks, forward +
backward, with the same weights copied in and the outputs cross-checked in fp32.

Peers:
- Hugging Face transformers' DeepseekV3MoE (router + routed experts + one shared expert), once per
  experts implementation the installed version offers on CPU (`config._experts_implementation`:
  'eager' = a Python loop over experts with F.linear, 'grouped_mm' = sort + torch._grouped_mm;
  'batched_mm' gathers a [D, F] weight per token copy and is left out unless asked for with
  --hf-impls: at 32 tokens per expert it took 1.7 s per step here).
- torchtitan's MoE, when importable (it is not a dependency; skipped with a note otherwise).

Config (DeepseekV3-compatible): sigmoid scores, one expert group, top-k renormalised, routing
scale 1, selection bias (zeros), no auxiliary loss (the HF block computes none). Routing is
input-dependent, so both blocks route identically given the same router weights.

Contestants alternate within each repeat so that load drift on a shared machine hits all alike.
The dense matmul peak is measured in the same run; "of peak" is our expert + shared-expert FLOPs
6 * T * 3 * D * (k * F + s * Fs) over our median time, divided by that peak. A peer slower than
--budget-s / repeats per step gets fewer repeats (at least --min-repeats); the count is printed.

    .venv/bin/python bench/bench_peers.py            # full (~3 min on 2 cores)
    .venv/bin/python bench/bench_peers.py --quick    # fewer repeats, smaller slow-peer budget
    .venv/bin/python bench/bench_peers.py --baseline /tmp/fast_head.py   # also time another
        # moe_kernels/fast.py (e.g. `git show HEAD:moe_kernels/fast.py > /tmp/fast_head.py`) as "before"

In bf16 it also times "ours+shared fp32 (proposal)": our layer with the shared expert's matmuls
patched (in this script only) to run in fp32, to size a proposed moe/ change; see
`patch_shared_fp32`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_kernels as kernels  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.layer import MoELayer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def load_baseline_kernels(path: str):
    """FastKernels from another copy of moe_kernels/fast.py (imported inside the kernels package so its
    relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("moe_kernels._baseline_fast", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FastKernels()


def our_config(args) -> ModelConfig:
    return ModelConfig(hidden_size=args.hidden, num_experts=args.experts, top_k=args.topk,
                       expert_ffn_size=args.ffn, num_shared_experts=1, score_func="sigmoid",
                       norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                       expert_bias=True, aux_loss_coeff=0.0, z_loss_coeff=0.0)


def build_ours(args, kernel_set) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(our_config(args), kernel_set)
    with torch.no_grad():
        # Scale so routing is not a near-tie everywhere and outputs are O(1).
        layer.router.weight.normal_(0.0, 0.5 / args.hidden ** 0.5)
        for w in (layer.experts.w1_EDF, layer.experts.w3_EDF):
            w.normal_(0.0, 1.0 / args.hidden ** 0.5)
        layer.experts.w2_EFD.normal_(0.0, 1.0 / args.ffn ** 0.5)
    return layer


def hf_available() -> str | None:
    try:
        import transformers  # noqa: F401
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: F401
        return transformers.__version__
    except Exception:
        return None


def build_hf(args, ours: MoELayer, impl: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           moe_intermediate_size=args.ffn, n_routed_experts=args.experts,
                           num_experts_per_tok=args.topk, n_shared_experts=1, n_group=1, topk_group=1,
                           norm_topk_prob=True, routed_scaling_factor=1.0, hidden_act="silu",
                           num_hidden_layers=1)
    cfg._experts_implementation = impl
    m = DeepseekV3MoE(cfg)
    e = ours.experts
    with torch.no_grad():
        m.gate.weight.copy_(ours.router.weight)
        m.gate.e_score_correction_bias.copy_(ours.router.expert_bias)
        # HF: gate_up_proj[e] = [gate; up] as [2F, D] (F.linear layout); ours w1/w3 are [D, F].
        m.experts.gate_up_proj.copy_(torch.cat([e.w1_EDF.transpose(1, 2), e.w3_EDF.transpose(1, 2)], dim=1))
        m.experts.down_proj.copy_(e.w2_EFD.transpose(1, 2))
        m.shared_experts.gate_proj.weight.copy_(ours.shared.w1.weight)
        m.shared_experts.up_proj.weight.copy_(ours.shared.w3.weight)
        m.shared_experts.down_proj.weight.copy_(ours.shared.w2.weight)
    return m


def build_torchtitan(args):
    """torchtitan's MoE if it imports; None with the reason otherwise."""
    try:
        from torchtitan.models.moe import MoE, MoEArgs  # type: ignore  # noqa: F401
    except Exception as exc:  # not installed (the usual case) or API moved
        return None, f"{type(exc).__name__}: {exc}"
    return None, "importable, but weight copy / config mapping not implemented for this version"


def patch_shared_fp32(layer: MoELayer) -> MoELayer:
    """Bench-only stand-in for a proposed moe/ change: the shared expert's three matmuls in fp32
    (what moe_kernels.fast does for the routed experts on a CPU without a native bf16 GEMM). moe/ runs
    it as bf16 nn.Linear, whose backward here is torch's scalar bf16 loop."""
    import torch.nn.functional as F

    shared = layer.shared

    def forward(x):
        xf = x.float()
        h = F.silu(xf @ shared.w1.weight.float().t()) * (xf @ shared.w3.weight.float().t())
        return (h @ shared.w2.weight.float().t()).to(x.dtype)

    shared.forward = forward
    return layer


def ours_fn(layer):
    def run(x):
        return layer(x)[0]
    return run


def make_step(module, fwd, x, g):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        fwd(x).backward(g)
    return step


def measure_peak(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best dense matmul GFLOP/s over a few shapes and both operand layouts (A @ B and A @ B^T with
    B stored like nn.Linear's weight); bf16 without a native GEMM is slow, so it gets small shapes."""
    shapes = [(2048, 512, 1024), (1024, 1024, 1024)] if dtype == torch.float32 else [(512, 512, 512)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        for b, fn in ((torch.randn(k, n).to(dtype), lambda a, b: a @ b),
                      (torch.randn(n, k).to(dtype), lambda a, b: a @ b.t())):
            fn(a, b)
            times, t_end = [], time.perf_counter() + seconds / (2 * len(shapes))
            while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
                t0 = time.perf_counter()
                fn(a, b)
                times.append(time.perf_counter() - t0)
            best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
    return best


def time_contestants(steps: dict, repeats: int, min_repeats: int, budget_s: float, warmup: int) -> dict:
    """Median seconds per contestant; contestants alternate within each repeat."""
    single = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        step()
        single[name] = time.perf_counter() - t0
    reps = {n: max(min_repeats, min(repeats, int(budget_s / max(t, 1e-9)))) for n, t in single.items()}
    times = {n: [] for n in steps}
    for i in range(max(reps.values())):
        for name, step in steps.items():
            if i < reps[name]:
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(v), len(v)) for n, v in times.items()}


def cross_check(ours, peers: dict, x: torch.Tensor, g: torch.Tensor) -> None:
    """fp32: forward output and input gradient of each peer against ours (max abs diff)."""
    def run(fwd):
        xx = x.detach().clone().requires_grad_()
        y = fwd(xx)
        y.backward(g)
        return y.detach(), xx.grad
    y0, gx0 = run(ours)
    scale = y0.abs().max().item()
    for name, fwd in peers.items():
        y, gx = run(fwd)
        print(f"    cross-check fp32 {name:<16} max|dy| {(y - y0).abs().max().item():.2e} "
              f"(max|y| {scale:.2f})   max|dx| {(gx - gx0).abs().max().item():.2e}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and a smaller slow-peer budget")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per contestant (default 15, quick 10)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget per contestant per case (default 25 s, quick 8 s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--tokens-per-expert", default="512,32")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--hf-impls", default="eager,grouped_mm")
    p.add_argument("--baseline", default=None, help="path of another moe_kernels/fast.py to time as 'before'")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-proposal", dest="proposal", action="store_false",
                   help="bf16: do not also time ours with the shared expert in fp32 (bench-only patch)")
    args = p.parse_args()
    args.repeats = args.repeats or (10 if args.quick else 15)
    args.budget_s = args.budget_s or (8.0 if args.quick else 25.0)
    return args


def contestants(args, dn: str, ours, hf: dict, x32, g32) -> dict:
    """name -> (module, forward) timed at dtype `dn`; in fp32 the peers are first cross-checked."""
    base = build_ours(args, load_baseline_kernels(args.baseline)) if args.baseline else None
    if dn == "fp32":
        peers = dict(hf)
        if base is not None:
            peers["ours (baseline)"] = ours_fn(base)
        cross_check(ours_fn(ours), peers, x32, g32)
    modules = {"ours": (ours, ours_fn(ours))}
    if base is not None:
        modules["ours (baseline)"] = (base, ours_fn(base))
    if dn == "bf16" and args.proposal:
        prop = patch_shared_fp32(build_ours(args, kernels.get_kernels("fast")))
        modules["ours+shared fp32 (proposal)"] = (prop, ours_fn(prop))
    modules.update({n: (m, m) for n, m in hf.items()})
    return modules


def run_case(args, dn: str, tpe: int, hf_impls: list) -> tuple:
    """Time every contestant at dtype `dn` and `tpe` tokens per expert; print and return the row."""
    dtype = DTYPES[dn]
    T = tpe * args.experts // args.topk
    ours = build_ours(args, kernels.get_kernels("fast"))
    gen = torch.Generator().manual_seed(1)
    x32 = torch.randn(1, T, args.hidden, generator=gen)
    g32 = torch.randn(1, T, args.hidden, generator=gen)
    hf = {f"HF {impl}": build_hf(args, ours, impl) for impl in hf_impls}
    modules = contestants(args, dn, ours, hf, x32, g32)
    x = x32.to(dtype).requires_grad_()
    g = g32.to(dtype)
    steps = {}
    for name, (mod, fwd) in modules.items():
        mod.to(dtype)
        steps[name] = make_step(mod, fwd, x, g)
    res = time_contestants(steps, args.repeats, args.min_repeats, args.budget_s, args.warmup)
    flops = 6 * T * 3 * args.hidden * (args.topk * args.ffn + 1 * args.ffn)
    t_ours = res["ours"][0]
    parts = [f"{n} {t * 1e3:.1f} ms (n={k}, x{t / t_ours:.2f})" for n, (t, k) in res.items() if n != "ours"]
    print(f"  {dn} {tpe:>4} tok/expert (T={T}): ours {t_ours * 1e3:.1f} ms (n={res['ours'][1]}); "
          + "; ".join(parts))
    return dn, tpe, T, res, flops


def print_table(rows: list, repeats: int, peaks: dict) -> None:
    names = list(dict.fromkeys(n for row in rows for n in row[3]))
    print("\n| dtype | tokens/expert (T) | " + " | ".join(f"{n} ms" for n in names)
          + " | " + " | ".join(f"{n} / ours" for n in names if n != "ours")
          + " | ours of peak (same dtype) | ours of fp32 peak |")
    print("|" + "---|" * (2 + len(names) + len(names) - 1 + 2))
    for dn, tpe, T, res, flops in rows:
        t_ours = res["ours"][0]
        cells = [(f"{res[n][0] * 1e3:.1f}" + (f" (n={res[n][1]})" if res[n][1] < repeats else "")) if n in res
                 else "-" for n in names]
        ratios = [f"{res[n][0] / t_ours:.2f}x" if n in res else "-" for n in names if n != "ours"]
        frac = flops / t_ours / 1e9
        print(f"| {dn} | {tpe} ({T}) | " + " | ".join(cells) + " | " + " | ".join(ratios)
              + f" | {frac / peaks[dn]:.0%} | {frac / peaks['fp32']:.0%} |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    hf_version = hf_available()
    print(f"torch {torch.__version__}, transformers {hf_version or 'not installed'}, CPU {cpu_model()}, "
          f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"D={args.hidden} F={args.ffn} E={args.experts} k={args.topk} shared=1 (Fs={args.ffn}), "
          f"forward+backward, median of up to {args.repeats} (slow peers: budget {args.budget_s:.0f} s, "
          f">= {args.min_repeats})")
    _, tt_note = build_torchtitan(args)
    print(f"torchtitan: skipped ({tt_note})")
    if hf_version is None:
        print("transformers: skipped (pip install transformers)")
    hf_impls = [s for s in args.hf_impls.split(",") if s] if hf_version else []
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    peaks = {dn: measure_peak(DTYPES[dn]) for dn in dtypes}
    peaks.setdefault("fp32", measure_peak(torch.float32))
    print("dense matmul peak (same run): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    rows = [run_case(args, dn, tpe, hf_impls) for dn in dtypes
            for tpe in [int(s) for s in args.tokens_per_expert.split(",")]]
    print_table(rows, args.repeats, peaks)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
