"""Calibration of communication and contention on this machine: gloo collectives (all-reduce,
all-gather, reduce-scatter, all-to-all) timed in spawned processes as a training step meets them,
the link fit through `comm.py`'s step and byte counts, and how much ranks running at once slow one
another. `calibrate.py` drives these and writes the profile."""
from __future__ import annotations

import math
import os
import socket
import statistics
import time

import torch

from simulator.comm import all_gather, all_reduce, all_to_all, reduce_scatter
from simulator.hardware import Link
from simulator.opbench import fit_two
from simulator.probe import SpeedProbe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], rounds: int, queue) -> None:
    """Each collective timed as a training step meets it: after a burst of compute (GEMMs and a
    write over memory larger than the caches), into a freshly allocated output. Back-to-back
    repeats of one collective on hot buffers ran 2-3x faster than the same exchange inside a step.
    Every (collective, size) is taken once per round, rounds one after another, so that a slow
    spell of a shared host spreads over all of them instead of skewing one."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    evict = torch.empty(16 * 2**20)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    def ops_of(n: int):
        buf, shard = torch.randn(n), torch.randn(n // world)
        return {"all_reduce": lambda: dist.all_reduce(buf),
                "all_gather": lambda: gather(torch.empty(n), shard),
                "reduce_scatter": lambda: scatter(torch.empty(n // world), buf),
                "all_to_all": lambda: dist.all_to_all_single(torch.empty(n), buf)}

    try:
        ops = [(name, n, fn) for n in (max(world, nbytes // 4 // world * world) for nbytes in sizes)
               for name, fn in ops_of(n).items()]
        times = {(name, n): [] for name, n, _ in ops}
        for r in range(rounds + 1):  # round 0 warms up gloo's pairs and buffers
            for name, n, fn in ops:
                for _ in range(4):
                    torch.mm(a, b)
                evict.fill_(1.0)
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name, n].append(time.perf_counter() - t0)
        if rank == 0:
            queue.put([(name, world, n * 4, step_share(ts)) for (name, n), ts in times.items()])
    finally:
        dist.destroy_process_group()


def step_share(times: list[float], tail: float = 0.025) -> float:
    """What one collective adds to a step: the mean of its timings, not the median. On a shared
    host a collective's time is heavy-tailed (waking gloo's threads: 0.3 to 8 ms for the same 1 MB
    all-reduce, the mean about twice the median), and a step pays the sum of dozens of them, whose
    typical value is the mean. The slowest `tail` of the samples is dropped: a spell long enough to
    make a whole step slow is one the validated median step leaves out too."""
    kept = sorted(times)[:max(1, math.ceil(len(times) * (1 - tail)))]
    return statistics.mean(kept)


def rank_counts() -> tuple[int, ...]:
    """World sizes to measure: 2, 4, 8 up to the core count (more ranks than cores measure the
    scheduler, not the link); at least 2."""
    cores = os.cpu_count() or 1
    return tuple(w for w in (2, 4, 8) if w <= cores) or (2,)


# message sizes that bracket what the validated layouts send (TP's ~0.4 MB activations up to
# gradient buckets of tens of MB)
COLLECTIVE_SIZES = (64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20, 16 * 2**20)


def measure_collectives(worlds=None, sizes=COLLECTIVE_SIZES, rounds: int = 40) -> list[tuple]:
    """(op, world, bytes, seconds) per collective and size, each `step_share` over `rounds`
    interleaved rounds (about 20 s at two ranks with the default sizes)."""
    import torch.multiprocessing as mp
    worlds = worlds or rank_counts()
    ctx = mp.get_context("spawn")
    out = []
    for world in worlds:
        queue = ctx.SimpleQueue()
        port = _free_port()
        procs = [ctx.Process(target=_collective_worker, args=(r, world, port, list(sizes), rounds, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        res = queue.get()
        for p in procs:
            p.join(timeout=60)
        out += res
    return out


def _concurrency_worker(barrier, queue) -> None:
    torch.set_num_threads(1)
    probe = SpeedProbe()
    probe.run()
    samples = []
    for _ in range(5):
        barrier.wait()  # the ranks probe together, as they train together
        samples.append(probe.run())
    queue.put(samples)


def measure_concurrency(worlds=(2,)) -> tuple[dict[int, float], list[float]]:
    """How much ranks running at once on this machine slow one another (shared caches, memory
    bandwidth, the hypervisor's cores): w -> the slowest rank's speed probe (`probe.py`) at w ranks
    over the probe alone (medians of 5), in separate processes as torchrun's ranks are. Also returns
    the probe samples taken alone, which the profile's baseline includes."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    res, alone = {}, []
    for w in (1, *worlds):
        barrier, queue = ctx.Barrier(w), ctx.SimpleQueue()
        procs = [ctx.Process(target=_concurrency_worker, args=(barrier, queue)) for _ in range(w)]
        for p in procs:
            p.start()
        out = [queue.get() for _ in procs]
        for p in procs:
            p.join(timeout=60)
        res[w] = statistics.median(max(col) for col in zip(*out))
        if w == 1:
            alone = out[0]
    return {w: res[w] / res[1] for w in worlds}, alone


def fit_link(samples: list[tuple]) -> tuple[Link, float]:
    """Least-squares fit (relative error) of t = steps * latency + bytes / bandwidth with comm.py's
    step and byte counts."""
    rows = []
    for name, world, nbytes, t in samples:
        c = {"all_reduce": all_reduce(nbytes, world, 1, world), "all_gather": all_gather(nbytes, world, 1, world),
             "reduce_scatter": reduce_scatter(nbytes, world, 1, world),
             "all_to_all": all_to_all(nbytes, world, 1, world)}[name]
        rows.append((c.steps, c.bytes, t))
    # each sample scaled by 1/t so that small messages (latency) count as much as large ones
    # (bandwidth): relative error
    lat, inv_bw = fit_two([(s / t, b / t, 1.0) for s, b, t in rows]) or (-1.0, -1.0)
    if lat < 0 or inv_bw <= 0:  # degenerate noise: fall back to bandwidth from the largest messages
        lat = max(0.0, lat)
        big = [r for r in rows if r[1] == max(x[1] for x in rows)]
        inv_bw = statistics.median((t - s * lat) / b for s, b, t in big if b)
    rms = math.sqrt(statistics.mean((math.log((s * lat + b * inv_bw) / t)) ** 2 for s, b, t in rows))
    return Link(bandwidth_gbps=1 / inv_bw / 1e9, latency_us=lat * 1e6), rms
