"""Benchmark: one MoE training step with expert parallelism (ep = 4, gloo on CPU) for each token
dispatcher, side by side: step time and the bytes each dispatcher sends intra- and inter-node.

Four processes form 2 "nodes" of 2 ranks (parallel.devices_per_node = 2). Every rank builds the same
small MoE transformer; each configuration (all-to-all with and without overlap, all-gather,
hierarchical) gets its own model, process groups and optimizer, and the configurations take turns
step by step so drift in a shared machine's load hits all alike. A step is forward + backward +
gradient reduction + AdamW on a micro-batch per rank; its time is the slowest rank's. Bytes are
logical payload summed over the 4 ranks, forward and backward, as the training log reports them.

    python bench/bench_dispatchers.py --steps 10 --warmup 2
"""
from __future__ import annotations

import argparse
import statistics

from _common import add_size_args, build_run, init_rank, machine, model_config, rank_tokens, spawn, timed_step

CONFIGS = [  # (label, dispatcher, overlap)
    ("alltoall", "alltoall", True),
    ("alltoall, no overlap", "alltoall", False),
    ("allgather", "allgather", True),
    ("hierarchical", "hierarchical", True),
]


def _rank(rank: int, world: int, store: str, args, queue) -> None:
    import torch.distributed as dist

    from parallel.config import ParallelConfig

    init_rank(rank, world, store)
    cfg = model_config(args.hidden, args.seq, args.experts, args.topk)
    runs = [(label, *build_run(cfg, ParallelConfig(ep=world, dispatcher=dispatcher, overlap=overlap,
                                                   devices_per_node=args.devices_per_node)), [])
            for label, dispatcher, overlap in CONFIGS]
    tokens = rank_tokens(rank, args.batch, args.seq)
    for step in range(args.warmup + args.steps):
        for label, model, rt, opt, times in runs:
            elapsed = timed_step(model, rt, opt, tokens)
            metrics = rt.step_metrics()
            if step >= args.warmup:
                times.append((elapsed, metrics["comm_intra_node_bytes"], metrics["comm_inter_node_bytes"],
                              metrics["ep_recv_imbalance"]))
    if rank == 0:
        queue.put([(label, times) for label, _, _, _, times in runs])
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(ap)
    args = ap.parse_args()
    results = spawn(_rank, args.world, args)

    print(f"{machine()}; "
          f"{args.world} ranks = ep {args.world} over {args.world // args.devices_per_node} nodes x "
          f"{args.devices_per_node}; per rank {args.batch}x{args.seq} tokens, D={args.hidden}, "
          f"E={args.experts}, top-{args.topk}, 2 MoE layers; medians of {args.steps} steps")
    base = statistics.median(t for t, *_ in results[0][1])
    print("| dispatcher | step time | vs alltoall | intra-node MB/step | inter-node MB/step | "
          f"EP recv max/mean |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rows in results:
        t = statistics.median(r[0] for r in rows)
        intra = statistics.median(r[1] for r in rows) / 2**20
        inter = statistics.median(r[2] for r in rows) / 2**20
        imb = statistics.median(r[3] for r in rows)
        print(f"| {label} | {1000 * t:.1f} ms | {base / t:.2f}x | {intra:.2f} | {inter:.2f} | {imb:.2f} |")


if __name__ == "__main__":
    main()
