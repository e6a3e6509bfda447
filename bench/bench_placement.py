"""Benchmark: dynamic expert placement on a skewed, drifting workload, under emulated links.

Four gloo processes (ep = 4 over 2 emulated "nodes" of 2 ranks, alltoall dispatcher) train the same
MoE twice from the same seed, placement off and on, taking turns step by step so drift in the
shared machine's load hits both alike. Routing follows a drifting Zipf popularity
(parallel/skew.py). Per step we record, for every MoE layer, max/mean tokens per EP rank on the
global batch (the rank loads implied by the step's expert counts and the placement it ran with),
and the step time of the slowest rank (forward, backward, gradient reduction, AdamW and, with
placement, the check and any migration). Reported: medians over the measured steps (after
`--warmup`, which covers the first check), the drop of the imbalance's excess over 1, and the ratio
of step times.

    python bench/bench_placement.py --steps 30 --warmup 10
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(args, placed: bool) -> dict:
    """One configuration on this rank: model, runtime, optimizer, skewed workload, maybe placement."""
    from moe_kernels import get_kernels
    from moe.config import ModelConfig
    from moe.model import MoETransformer
    from parallel.config import EmulateLinks, LinkSpec, ParallelConfig
    from parallel.placement_runtime import ExpertPlacement
    from parallel.runtime import ParallelRuntime
    from parallel.skew import ZipfSkew
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=3, first_k_dense=1, max_seq_len=args.seq,
                      num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, dense_ffn_size=2 * args.hidden, num_experts=args.experts, top_k=args.topk,
                      expert_ffn_size=args.expert_ffn, num_shared_experts=1, aux_loss_coeff=0.0)
    links = EmulateLinks(intra_node=LinkSpec(10.0, args.intra_bw), inter_node=LinkSpec(50.0, args.inter_bw))
    torch.manual_seed(0)
    model = MoETransformer(cfg, get_kernels("fast"))
    rt = ParallelRuntime.setup(ParallelConfig(ep=args.world, dispatcher="alltoall", devices_per_node=2,
                                              emulate_links=links), cfg)
    rt.parallelize(model)
    skew = ZipfSkew(args.experts, alpha=args.alpha, strength=1.0, period=args.period, seed=3)
    skew.install(model)
    placement = (ExpertPlacement(model, rt.meshes.ep_group, interval=args.interval, decay=args.decay, margin=args.margin)
                 if placed else None)
    return {"model": model, "rt": rt, "opt": torch.optim.AdamW(model.parameters(), lr=1e-3), "skew": skew,
            "placement": placement, "rows": []}


def _step(run: dict, step: int, tokens: torch.Tensor) -> None:
    """One timed step of one configuration (a collective); appends (slowest rank's seconds, mean
    over layers of max/mean tokens per EP rank, layer migrations, bytes this rank sent, the largest
    emulated link time any rank was charged)."""
    import torch.distributed as dist
    from parallel.placement import imbalance, rank_loads
    model, rt, opt, placement = run["model"], run["rt"], run["opt"], run["placement"]
    from parallel import emulated_links
    run["skew"].set_step(step)
    emulated_links.take_exposure()  # start this step's ledger of emulated link time
    dist.barrier()
    t0 = time.perf_counter()
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    rt.grad_reducer(None, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loads = [layer.routing_load() for layer in model.moe_layers()]
    m = placement.after_step(loads, opt) if placement is not None else None
    elapsed = torch.tensor([time.perf_counter() - t0, emulated_links.take_exposure().charged_s])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's step and link time
    if m is None:  # the same figure the placement run reports, for the contiguous placement
        summed = torch.stack([x.double() for x in loads])
        dist.all_reduce(summed)
        identity = torch.arange(summed.shape[1])
        imb, moved, sent = [imbalance(rank_loads(x, identity, rt.layout.ep)) for x in summed], 0, 0
    else:
        imb, moved, sent = m["placement_imbalance_after"], m["placement_migrations"], m["placement_bytes"]
    run["rows"].append((float(elapsed[0]), statistics.mean(imb), moved, sent, float(elapsed[1])))


def _rank(rank: int, args, store: str, queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)  # the ranks share the box's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    runs = {"off": _setup(args, False), "on": _setup(args, True)}
    g = torch.Generator().manual_seed(1 + rank)
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
        for run in runs.values():
            _step(run, step, tokens)
    if rank == 0:
        queue.put({k: v["rows"] for k, v in runs.items()})
    dist.destroy_process_group()


def _spawn(args) -> dict:
    """Run `_rank` on `args.world` processes (torch's spawn raises if any rank fails); rank 0's rows."""
    import torch.multiprocessing as tmp_mp
    queue = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_mp.spawn(_rank, args=(args, f"{tmp}/store", queue), nprocs=args.world, join=True)
    return queue.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4, help="processes = ep (default 4, 2 emulated nodes of 2)")
    ap.add_argument("--steps", type=int, default=30, help="measured steps")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured steps first (covers the first check)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=1.2, help="Zipf exponent of expert popularity")
    ap.add_argument("--period", type=int, default=20, help="steps between popularity orders (drift)")
    ap.add_argument("--interval", type=int, default=5, help="placement check every N steps")
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--decay", type=float, default=0.5, help="load EMA weight of the past")
    ap.add_argument("--intra-bw", type=float, default=0.05, help="emulated GB/s inside a node")
    ap.add_argument("--inter-bw", type=float, default=0.02, help="emulated GB/s between nodes")
    args = ap.parse_args()
    _report(args, _spawn(args))


def _report(args, rows: dict) -> None:
    """Medians over the measured steps; step and link times also as per-step ratios on / off
    (paired: the two runs take turns, so a load swing of the shared box hits both halves of a pair)
    over the steps without a migration, whose cost is reported on its own."""
    off, on = rows["off"][args.warmup:], rows["on"][args.warmup:]
    imb_off, imb_on = (statistics.median(r[1] for r in v) for v in (off, on))
    steady = [(a, b) for a, b in zip(off, on) if not b[2]]
    t_off, t_on = (statistics.median(p[i][0] for p in steady) for i in (0, 1))
    c_off, c_on = (statistics.median(p[i][4] for p in steady) for i in (0, 1))
    t_ratio = statistics.median(b[0] / a[0] for a, b in steady)
    c_ratio = statistics.median(b[4] / a[4] for a, b in steady)
    mig = [(a, b) for a, b in zip(rows["off"], rows["on"]) if b[2]]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo; "
          f"ep {args.world} alltoall, emulated links intra {args.intra_bw} GB/s / inter {args.inter_bw} GB/s; "
          f"per rank {args.batch}x{args.seq} tokens, D={args.hidden}, E={args.experts}, top-{args.topk}, "
          f"expert FFN {args.expert_ffn}, 2 MoE layers; Zipf alpha {args.alpha}, period {args.period}; "
          f"placement every {args.interval} steps, EMA decay {args.decay}, margin {args.margin}; "
          f"{args.steps} measured steps after {args.warmup}, {len(steady)} of them without a migration")
    print("| | max/mean tokens per EP rank | slowest-rank step time | largest emulated link time of a rank |")
    print("|---|---:|---:|---:|")
    print(f"| placement off | {imb_off:.3f} | {1000 * t_off:.1f} ms | {1000 * c_off:.1f} ms |")
    print(f"| placement on | {imb_on:.3f} | {1000 * t_on:.1f} ms | {1000 * c_on:.1f} ms |")
    drop = 1 - (imb_on - 1) / (imb_off - 1) if imb_off > 1 else float("nan")
    extra = statistics.mean(b[0] - a[0] for a, b in mig) if mig else 0.0
    print(f"excess over 1 reduced by {100 * drop:.0f} %; paired per-step ratio on / off: step time {t_ratio:.3f}, "
          f"link time {c_ratio:.3f}; {sum(b[2] for _, b in mig)} layer migrations in {len(mig)} steps "
          f"(rank 0 sent {sum(b[3] for _, b in mig) / 2**20:.2f} MB), a migrating step {1000 * extra:.0f} ms "
          "slower than its pair on average")

if __name__ == "__main__":
    main()
