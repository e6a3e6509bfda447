"""Calibration: microbenchmarks on this machine, fitted into a hardware profile.

Measures, with the same PyTorch the trainer uses:
- matmul time over a grid of (m, k, n) shapes: the best rate becomes the peak, and the matmul
  efficiency curve (peak_fraction, half_dim) is fitted to all shapes through the same roofline the
  cost model evaluates;
- causal scaled-dot-product attention, giving the attention factor against a GEMM of its shape;
- memory bandwidth (a large element-wise add) and the fixed cost of one operator under autograd
  (a chain of tiny ops, forward and backward);
- gloo collectives (all-reduce, all-gather, all-to-all) at world sizes 2 and 4, spawned with
  torch.multiprocessing; bandwidth and per-step latency are fitted to the step and byte counts of
  `comm.py`, so prediction and measurement use the same formulas.
On one box every "node" is the same machine: the inter-node link is set to the measured one.
"""
from __future__ import annotations

import math
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from simulator.comm import all_gather, all_reduce, all_to_all
from simulator.hardware import HARDWARE_DIR, HardwareProfile, Link, MatmulEfficiency

DEFAULT_OUT = HARDWARE_DIR / "cpu_calibrated.yaml"


def best_time(fn: Callable[[], object], repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Fastest of `repeats` runs (after one warm-up): the least disturbed by other load."""
    fn()
    best, start, n = math.inf, time.perf_counter(), 0
    while n < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def measure_matmuls(dims_m, dims_k, dims_n, dtype=torch.float32) -> list[tuple[int, int, int, float]]:
    out = []
    for m in dims_m:
        for k in dims_k:
            for n in dims_n:
                a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
                reps = 3 if m * k * n > 2**28 else 7
                out.append((m, k, n, best_time(lambda: a @ b, reps)))
    return out


def measure_bandwidth(elems: int = 8 * 2**20) -> float:
    """Bytes/s of an element-wise add (two reads, one write) on fp32 tensors far larger than cache."""
    x, y = torch.randn(elems), torch.randn(elems)
    z = torch.empty(elems)
    t = best_time(lambda: torch.add(x, y, out=z), 7)
    return 3 * 4 * elems / t


def measure_op_overhead(chain: int = 20) -> float:
    """Seconds per launched op under autograd: a chain of tiny ops, forward + backward. The cost
    model charges one overhead per forward kernel and two per backward one, so divide by 3 * chain."""
    x = torch.randn(8, requires_grad=True)

    def run():
        y = x
        for _ in range(chain):
            y = y * 1.0001
        y.sum().backward()

    return best_time(run, 15) / (3 * chain)


def measure_attention(peak: float, eff: MatmulEfficiency, shapes=((2, 4, 256, 48), (4, 4, 128, 48))) -> float:
    """Attention factor: measured causal SDPA forward rate over the GEMM model's rate for its shape."""
    ratios = []
    for b, h, s, d in shapes:
        q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
        t = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), 5)
        flops = 2.0 * b * h * s * (s / 2) * (d + d)
        ratios.append((flops / t) / (peak * eff(s, d, s / 2)))
    return float(min(2.0, max(0.05, statistics.geometric_mean(ratios))))


def fit_matmul(samples, peak: float, mem_bw: float, overhead: float) -> tuple[MatmulEfficiency, float]:
    """Grid-fit (peak_fraction, half_dim) minimising squared log error of the roofline prediction."""
    best = (math.inf, None)
    for half in [0] + [2 ** (i / 2) for i in range(2, 21)]:
        for pf in [0.3 + 0.025 * i for i in range(29)]:
            eff = MatmulEfficiency(peak_fraction=pf, half_dim=half)
            err = 0.0
            for m, k, n, t in samples:
                pred = max(2.0 * m * k * n / (peak * eff(m, k, n)), 4 * (m * k + k * n + m * n) / mem_bw) + overhead
                err += math.log(pred / t) ** 2
            if err < best[0]:
                best = (err, eff)
    rms = math.sqrt(best[0] / len(samples))
    return best[1], rms


# ----------------------------------------------------------------------------------------------
# gloo collectives


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = []
        for nbytes in sizes:
            n = max(world, nbytes // 4 // world * world)
            buf = torch.randn(n)
            out = torch.empty(n)
            shard = torch.randn(n // world)
            ops = {"all_reduce": lambda: dist.all_reduce(buf),
                   "all_gather": lambda: dist.all_gather_into_tensor(out, shard),
                   "all_to_all": lambda: dist.all_to_all_single(out, buf)}
            for name, fn in ops.items():
                times = []
                for i in range(6):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                res.append((name, world, n * 4, statistics.median(times[1:])))
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def measure_collectives(worlds=(2, 4), sizes=(64 * 2**10, 2**20, 8 * 2**20)) -> list[tuple]:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    out = []
    for world in worlds:
        queue = ctx.SimpleQueue()
        port = _free_port()
        procs = [ctx.Process(target=_collective_worker, args=(r, world, port, list(sizes), queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        res = queue.get()
        for p in procs:
            p.join(timeout=60)
        out += res
    return out


def fit_link(samples: list[tuple]) -> tuple[Link, float]:
    """Least-squares fit of t = steps * latency + bytes / bandwidth with comm.py's counts."""
    rows = []
    for name, world, nbytes, t in samples:
        c = {"all_reduce": all_reduce(nbytes, world, 1, world), "all_gather": all_gather(nbytes, world, 1, world),
             "all_to_all": all_to_all(nbytes, world, 1, world)}[name]
        rows.append((c.steps, c.bytes, t))
    # normal equations for two non-negative coefficients
    sxx = sum(s * s for s, _, _ in rows)
    sxy = sum(s * b for s, b, _ in rows)
    syy = sum(b * b for _, b, _ in rows)
    sxt = sum(s * t for s, _, t in rows)
    syt = sum(b * t for _, b, t in rows)
    det = sxx * syy - sxy * sxy
    lat = (sxt * syy - syt * sxy) / det
    inv_bw = (sxx * syt - sxy * sxt) / det
    if lat < 0 or inv_bw <= 0:  # degenerate noise: fall back to bandwidth from the largest messages
        lat = max(0.0, lat)
        big = [r for r in rows if r[1] == max(x[1] for x in rows)]
        inv_bw = statistics.median((t - s * lat) / b for s, b, t in big if b)
    rms = math.sqrt(statistics.mean((math.log((s * lat + b * inv_bw) / t)) ** 2 for s, b, t in rows))
    return Link(bandwidth_gbps=1 / inv_bw / 1e9, latency_us=lat * 1e6), rms


def calibrate(out: str | Path = DEFAULT_OUT, quick: bool = False, collectives: bool = True,
              log: Callable[[str], None] = print) -> HardwareProfile:
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    log(f"calibrating on {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")
    mem_bw = measure_bandwidth()
    overhead = measure_op_overhead()
    log(f"  memory bandwidth {mem_bw / 1e9:.1f} GB/s, op overhead {overhead * 1e6:.1f} us")
    dims = [16, 64, 256, 1024] if not quick else [32, 256, 1024]
    samples = measure_matmuls(dims, dims[1:], dims[1:])
    peak = max(2.0 * m * k * n / t for m, k, n, t in samples)
    eff, rms = fit_matmul(samples, peak, mem_bw, overhead)
    log(f"  matmul peak {peak / 1e9:.1f} GFLOP/s over {len(samples)} shapes; fitted peak_fraction "
        f"{eff.peak_fraction:.3f}, half_dim {eff.half_dim:.1f} (rms log error {rms:.2f})")
    eff.attention_factor = measure_attention(peak, eff)
    log(f"  attention factor {eff.attention_factor:.2f}")
    link, link_rms = Link(bandwidth_gbps=mem_bw / 1e9, latency_us=50.0), float("nan")
    coll = []
    if collectives:
        coll = measure_collectives(sizes=(64 * 2**10, 2**20) if quick else (64 * 2**10, 2**20, 8 * 2**20))
        link, link_rms = fit_link(coll)
        log(f"  gloo link: {link.bandwidth_gbps:.2f} GB/s, {link.latency_us:.0f} us per step "
            f"(rms log error {link_rms:.2f}, {len(coll)} samples)")
    mem_gb = _physical_memory_gb()
    prof = HardwareProfile(
        name="cpu_calibrated", device="cpu", peak_tflops={"fp32": peak / 1e12},
        memory_gb=mem_gb, memory_bandwidth_gbps=mem_bw / 1e9, devices_per_node=os.cpu_count() or 1,
        intra_node=link, inter_node=Link(link.bandwidth_gbps, link.latency_us),
        host_link=Link(mem_bw / 1e9, 1.0), matmul=eff, host_memory_bandwidth_gbps=mem_bw / 1e9,
        op_overhead_us=overhead * 1e6, reserved_memory_gb=min(2.0, mem_gb / 4),
        notes=(f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs with {threads} torch "
               f"threads; matmul fit rms log error {rms:.2f}; link fit rms {link_rms:.2f}; "
               f"{time.perf_counter() - t_start:.0f} s"))
    prof.validate("hardware")
    write_profile(prof, out, samples, coll)
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return prof


def _physical_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 16.0


def write_profile(prof: HardwareProfile, out: str | Path, samples=(), coll=()) -> Path:
    from dataclasses import asdict
    data = asdict(prof)
    header = ["# Written by `python -m simulator calibrate`; measurements from this machine.",
              "# matmul samples (m, k, n, seconds):"]
    header += [f"#   {m} {k} {n} {t:.3e}" for m, k, n, t in samples]
    header += ["# collective samples (op, world, bytes, seconds):"]
    header += [f"#   {op} {w} {b} {t:.3e}" for op, w, b, t in coll]
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False))
    return p
