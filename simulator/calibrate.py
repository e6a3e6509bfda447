"""Calibration: microbenchmarks on this machine, fitted into a hardware profile.

Measures, with the same PyTorch the trainer uses:
- linear layers forward + backward over a grid of (m, k, n) shapes: the peak rate and the matmul
  efficiency curve's half_dim are fitted to all shapes through the same roofline the cost model
  evaluates;
- causal scaled-dot-product attention forward + backward, giving the attention factor against a
  GEMM of its shape;
- memory bandwidth (a large element-wise add) and the fixed cost of one operator under autograd
  (a chain of tiny ops, forward and backward);
- the project's element-wise operators and the optimizer step (`opbench.py`);
- how much ranks running at once slow one another on this machine, and the speed probe's baseline
  (`probe.py`), which `validate` compares with the machine's speed during each case;
- gloo collectives (all-reduce, all-gather, reduce-scatter, all-to-all) at world sizes up to the
  core count, spawned with torch.multiprocessing, each timed after a burst of compute as a training
  step meets it (`calibrate_comm.py`); bandwidth and per-step latency are fitted to the step and
  byte counts of `comm.py` for each kind (`collective_links`) and for all together (the profile's
  links), so prediction and measurement use the same formulas;
- real training steps of a small held-out model (`calibrate_steps.py`) in one process at three
  sizes, fitting `work_correction` and `overhead_correction` (what isolated operator timings miss).
On one box every "node" is the same machine: the inter-node link is set to the measured one.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import yaml

from simulator.calibrate_comm import fit_link, measure_collectives, measure_concurrency, rank_counts
from simulator.calibrate_steps import measure_corrections
from simulator.hardware import COLLECTIVE_KINDS, HARDWARE_DIR, HardwareProfile, Link, MatmulEfficiency
from simulator.opbench import attention_fwd_bwd, eltwise_costs, linear_fwd_bwd, optimizer_cost, timed
from config import ConfigError
from simulator.machine import this_machine
from simulator.probe import SpeedProbe

DEFAULT_OUT = HARDWARE_DIR / "cpu_calibrated.yaml"


def measure_bandwidth(elems: int = 8 * 2**20) -> float:
    """Bytes/s of an element-wise add (two reads, one write) on fp32 tensors far larger than cache."""
    x, y = torch.randn(elems), torch.randn(elems)
    z = torch.empty(elems)
    return 3 * 4 * elems / timed(lambda: torch.add(x, y, out=z), min_s=0.1)


def measure_op_overhead(chain: int = 20) -> float:
    """Seconds per launched op under autograd: a chain of tiny ops, forward + backward. The cost
    model charges one overhead per forward kernel and two per backward one, so divide by 3 * chain."""
    x = torch.randn(8, requires_grad=True)

    def run():
        y = x
        for _ in range(chain):
            y = y * 1.0001
        y.sum().backward()

    return timed(run) / (3 * chain)


def _gemm(eff: MatmulEfficiency, peak: float, mem_bw: float, m: float, k: float, n: float) -> float:
    return max(2.0 * m * k * n / (peak * eff(m, k, n)), 4 * (m * k + k * n + m * n) / mem_bw)


def predict_linear(eff: MatmulEfficiency, peak: float, mem_bw: float, overhead: float, m, k, n) -> float:
    """compute.py's forward + backward of one linear layer: y, data gradient, weight gradient."""
    return (_gemm(eff, peak, mem_bw, m, k, n) + _gemm(eff, peak, mem_bw, m, n, k)
            + _gemm(eff, peak, mem_bw, k, m, n) + 3 * overhead)


def measure_linears(dims_m, dims_kn) -> list[tuple[int, int, int, float]]:
    return [(m, k, n, linear_fwd_bwd(m, k, n)) for m in dims_m for k in dims_kn for n in dims_kn]


def fit_matmul(samples, mem_bw: float, overhead: float) -> tuple[float, MatmulEfficiency, float]:
    """Grid fit of the peak rate and `half_dim` (with peak_fraction 1: on a CPU the peak is itself a
    fitted quantity, the rate an infinitely large GEMM would approach) minimising the squared log
    error of `predict_linear` over the samples."""
    best_rate = max(6.0 * m * k * n / t for m, k, n, t in samples)
    best = (math.inf, None, None)
    for half in [0] + [2 ** (i / 2) for i in range(2, 21)]:
        eff = MatmulEfficiency(peak_fraction=1.0, half_dim=half)
        for scale in [1.0 + 0.02 * i for i in range(101)]:
            peak = best_rate * scale
            err = sum(math.log(predict_linear(eff, peak, mem_bw, overhead, m, k, n) / t) ** 2
                      for m, k, n, t in samples)
            if err < best[0]:
                best = (err, peak, eff)
    return best[1], best[2], math.sqrt(best[0] / len(samples))


def fit_attention(peak: float, eff: MatmulEfficiency, overhead: float,
                  shapes=((4, 4, 128, 48, 32), (2, 4, 256, 48, 32))) -> float:
    """Attention factor such that compute.py's core attention (forward t, backward 2.5 t) matches
    measured causal SDPA forward + backward."""
    from simulator.compute import CORE_ATTN_BWD_FACTOR
    ratios = []
    for b, h, s, dq, dv in shapes:
        t = attention_fwd_bwd(b, h, s, dq, dv)
        flops = 2.0 * b * s * h * (s / 2) * (dq + dv)
        ideal = (1 + CORE_ATTN_BWD_FACTOR) * flops / (peak * eff(s, dq, s / 2))
        ratios.append(ideal / max(t - (1 + CORE_ATTN_BWD_FACTOR) * overhead, 1e-9))
    return float(min(2.0, max(0.01, statistics.geometric_mean(ratios))))


def calibrate(out: str | Path = DEFAULT_OUT, quick: bool = False, collectives: bool = True, threads: int = 1,
              log: Callable[[str], None] = print) -> HardwareProfile:
    """Measure and write a profile. One torch thread by default: on a shared machine a multi-threaded
    matmul stalls whenever a sibling thread is descheduled, so single-threaded timings are the
    repeatable ones; `validate` runs the trainer with the profile's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _calibrate(out, quick, collectives, threads, log)
    finally:
        torch.set_num_threads(before)


def _calibrate(out, quick: bool, collectives: bool, threads: int, log) -> HardwareProfile:
    """Every measurement in the order the profile needs them, then the profile. One sequence on
    purpose (about 60 lines): the speed probe must sit between the measurements it brackets."""
    t_start = time.perf_counter()
    log(f"calibrating on {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")
    # the speed probe, taken between the measurements below: the baseline `validate` compares
    # the machine's speed during each case with
    probe = SpeedProbe()
    probes = [probe.run()]
    mem_bw = measure_bandwidth()
    overhead = measure_op_overhead()
    log(f"  memory bandwidth {mem_bw / 1e9:.1f} GB/s, op overhead {overhead * 1e6:.1f} us")
    dims_m = [64, 256, 1024, 4096] if not quick else [64, 512, 2048]
    dims_kn = [64, 256, 1024] if not quick else [64, 512]
    samples = measure_linears(dims_m, dims_kn)
    probes.append(probe.run())
    peak, eff, rms = fit_matmul(samples, mem_bw, overhead)
    log(f"  linear fwd+bwd over {len(samples)} shapes: fitted peak {peak / 1e9:.1f} GFLOP/s, half_dim "
        f"{eff.half_dim:.1f} (rms log error {rms:.2f})")
    eff.attention_factor = fit_attention(peak, eff, overhead)
    log(f"  attention factor {eff.attention_factor:.2f}")
    router_gemm = lambda T: predict_linear(eff, peak, mem_bw, overhead, T, 256, 8)  # noqa: E731
    ops = eltwise_costs(router_gemm=router_gemm)
    probes.append(probe.run())
    opt_cost = optimizer_cost()
    probes.append(probe.run())
    log("  operators (fixed us, ns/element): " + ", ".join(f"{k} {v[0]:.0f}/{v[1]:.2f}" for k, v in ops.items()))
    log(f"  optimizer: {opt_cost[0]:.1f} us/tensor, {opt_cost[1]:.2f} ns/parameter")
    link, link_rms = Link(bandwidth_gbps=mem_bw / 1e9, latency_us=50.0), float("nan")
    coll = []
    concurrency, collective_links = {}, {}
    if collectives:
        concurrency, alone = measure_concurrency(rank_counts())
        probes += alone
        log("  concurrent ranks slow each other by: " + ", ".join(
            f"x{f:.2f} at {w} ranks" for w, f in concurrency.items()))
        coll = measure_collectives(sizes=(64 * 2**10, 2**20), rounds=10) if quick else measure_collectives()
        link, link_rms = fit_link(coll)
        log(f"  gloo, all collectives: {link.bandwidth_gbps:.2f} GB/s, {link.latency_us:.0f} us per step "
            f"(rms log error {link_rms:.2f}, {len(coll)} samples)")
        for kind in COLLECTIVE_KINDS:
            own, own_rms = fit_link([x for x in coll if x[0] == kind])
            collective_links[kind] = [own.bandwidth_gbps, own.latency_us]
            log(f"    {kind}: {own.bandwidth_gbps:.2f} GB/s, {own.latency_us:.0f} us per step (rms log error {own_rms:.2f})")
    speed_probe = statistics.median(probes)
    log(f"  speed probe: {speed_probe * 1e3:.2f} ms (median of {len(probes)})")
    mem_gb = _physical_memory_gb()
    prof = HardwareProfile(
        name="cpu_calibrated", device="cpu", peak_tflops={"fp32": peak / 1e12},
        memory_gb=mem_gb, memory_bandwidth_gbps=mem_bw / 1e9, devices_per_node=os.cpu_count() or 1,
        intra_node=link, inter_node=Link(link.bandwidth_gbps, link.latency_us),
        host_link=Link(mem_bw / 1e9, 1.0), matmul=eff, host_memory_bandwidth_gbps=mem_bw / 1e9,
        op_overhead_us=overhead * 1e6, reserved_memory_gb=min(2.0, mem_gb / 4), cpu_threads=threads,
        op_costs=ops, optimizer_cost=opt_cost, collective_links=collective_links,
        concurrency_slowdown=concurrency, speed_probe=speed_probe, measured_on=this_machine(threads),
        notes=(f"calibrated {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs with {threads} torch "
               f"threads; matmul fit rms log error {rms:.2f}; link fit rms {link_rms:.2f}; "
               f"{time.perf_counter() - t_start:.0f} s"))
    prof = replace(prof, **_previous_bands(out, log))
    prof.validate("hardware")
    prof.work_correction, prof.overhead_correction = measure_corrections(prof, log)
    log(f"  corrections: proportional costs x{prof.work_correction:.2f}, fixed costs x{prof.overhead_correction:.2f}")
    prof.notes += f"; corrections work x{prof.work_correction:.3f}, overhead x{prof.overhead_correction:.3f}"
    write_profile(prof, out, samples, coll)
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f} s")
    return prof


def _previous_bands(out, log) -> dict:
    """The error-band fields of the profile being replaced: they describe the cost model on this
    machine kind, which a recalibration does not change; the next `validate` re-measures them."""
    try:
        from simulator.hardware import load_hardware
        old = load_hardware(out)
    except (ConfigError, OSError):
        return {}
    if old.error_bands:
        log(f"  error bands kept from the previous profile ({old.error_band_cases} cases) until the next validate")
    return {"error_bands": dict(old.error_bands), "error_band_cases": old.error_band_cases,
            "error_bands_history": list(old.error_bands_history),
            "error_band_cases_history": list(old.error_band_cases_history)}


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
    tmp = p.with_name(f".{p.name}.tmp")  # never a half-written profile: write, then rename
    tmp.write_text("\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, p)
    return p
