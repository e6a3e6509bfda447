"""Benchmark: MoE training steps on a CPU box under emulated links (parallel.emulate_links), where
the inter-node link is several times slower than the intra-node one: flat all-to-all vs the
hierarchical dispatcher, each with the blocking gradient reduction and with the overlapped one
(parallel.grad_bucket_mb), and flat all-to-all with no overlap at all (parallel.overlap: false:
every exchange blocks), in one run. With overlap each token exchange starts, the shared expert's
half runs, then it is waited for, in forward and in backward.

Four gloo processes form 2 "nodes" of 2 ranks (ep = 4, top-4 of 16 experts). Every configuration
gets its own model, process groups and optimizer; they take turns step by step so drift in a shared
machine's load hits all alike. A step is forward + backward + gradient reduction + AdamW; its time is
the slowest rank's. Communication hidden / exposed comes from the runtime's own timestamps
(step metrics `comm_*`): hidden = in flight while other work ran, exposed = waited for.

    python bench/bench_links.py --steps 10 --warmup 2
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _common import (add_link_args, add_size_args, build_run, init_rank, link_settings, machine, model_config,
                     rank_tokens, spawn, timed_step)

CONFIGS = [  # (label, dispatcher, grad_bucket_mb, overlap)
    ("alltoall, no overlap", "alltoall", 0.0, False),
    ("alltoall", "alltoall", 0.0, True),
    ("hierarchical", "hierarchical", 0.0, True),
    ("alltoall + overlapped grads", "alltoall", 0.25, True),
    ("hierarchical + overlapped grads", "hierarchical", 0.25, True),
]


def _rank(rank: int, world: int, store: str, args, queue) -> None:
    import torch.distributed as dist

    from parallel import emulated_links
    from parallel.config import ParallelConfig

    init_rank(rank, world, store)
    cfg = model_config(args.hidden, args.seq, args.experts, args.topk)
    links, _ = link_settings(args)
    runs = [(label, *build_run(cfg, ParallelConfig(ep=world, dispatcher=dispatcher, devices_per_node=args.devices_per_node,
                                                   emulate_links=links, grad_bucket_mb=bucket_mb,
                                                   overlap=overlap)), [])
            for label, dispatcher, bucket_mb, overlap in CONFIGS]
    tokens = rank_tokens(rank, args.batch, args.seq)
    for step in range(args.warmup + args.steps):
        for label, model, rt, opt, rows in runs:
            # every runtime installs its links at set-up: re-install this one's (same links, its node map)
            emulated_links.install(links, rt.layout.node_of, rank)
            elapsed = timed_step(model, rt, opt, tokens)
            exposure = emulated_links.take_exposure()
            ar = exposure.by_kind.get("all_reduce", [0.0, 0.0])
            mine = torch.tensor([exposure.hidden_s, exposure.exposed_s, exposure.charged_s, ar[0], ar[1]],
                                dtype=torch.float64)
            dist.all_reduce(mine)
            metrics = rt.step_metrics()
            if step >= args.warmup:
                rows.append((elapsed, *(mine / world).tolist(), metrics["comm_inter_node_bytes"]))
    if rank == 0:
        queue.put([(label, rows) for label, _, _, _, rows in runs])
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(ap)
    add_link_args(ap, 0.04, 0.005)
    args = ap.parse_args()
    results = spawn(_rank, args.world, args)

    print(f"{machine()}; "
          f"{args.world} ranks = ep {args.world} over {args.world // args.devices_per_node} nodes x "
          f"{args.devices_per_node}; {link_settings(args)[1]}; per rank {args.batch}x{args.seq} tokens, D={args.hidden}, "
          f"E={args.experts}, top-{args.topk}, 2 MoE layers; medians of {args.steps} steps (mean over ranks)")
    base = statistics.median(r[0] for r in results[0][1])
    print("| configuration | step time | vs no overlap | emulated comm | hidden | exposed | hidden fraction "
          "| grad all-reduce hidden / exposed | inter-node MB/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, rows in results:
        t, hid, exp, charged, ar_h, ar_e, inter = (statistics.median(r[i] for r in rows) for i in range(7))
        frac = hid / (hid + exp) if hid + exp else 0.0
        ar = ar_h / (ar_h + ar_e) if ar_h + ar_e else 0.0
        print(f"| {label} | {1000 * t:.1f} ms | {base / t:.2f}x | {1000 * charged:.1f} ms | {1000 * hid:.1f} ms | "
              f"{1000 * exp:.1f} ms | {100 * frac:.0f} % | {100 * ar:.0f} % / {1000 * ar_e:.1f} ms | {inter / 2**20:.2f} |")


if __name__ == "__main__":
    main()
