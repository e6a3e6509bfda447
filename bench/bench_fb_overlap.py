"""Benchmark: cross-micro-batch overlap (parallel.fb_overlap) under emulated links, against no
overlap, the in-layer overlap alone, and the same step with free links (compute only), in one run.

Every configuration trains the same model on the same micro-batches through the trainer's step
(`grad_accum` micro-batches, gradient clipping, AdamW); they take turns step by step. From the step
times (medians, slowest rank): the communication share of the non-overlapped step,
(T_no_overlap - T_free) / T_no_overlap, and for each overlapped configuration the part of that
communication it hides, (T_no_overlap - T) / (T_no_overlap - T_free). The runtime's own timestamps
give the same from the inside: 1 - exposed / charged link time (`comm_link_hidden_fraction`), where
"exposed" counts only the time every lane of the rank was blocked in a wait.

    python bench/bench_fb_overlap.py --steps 8 --warmup 2
    python bench/bench_fb_overlap.py --pp 2 --world 4 --devices-per-node 2    # pipeline steady state
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _common import add_link_args, add_size_args, link_settings, init_rank, machine, model_config, spawn

CONFIGS = [  # (label, emulated links?, overlap, grad_bucket_mb, fb_overlap)
    ("free links (compute only)", False, True, 0.25, False),
    ("no overlap", True, False, 0.0, False),
    ("in-layer overlap + overlapped grads", True, True, 0.25, False),
    ("fb_overlap + in-layer + overlapped grads", True, True, 0.25, True),
]


def _rank(rank: int, world: int, store: str, args, queue) -> None:
    import time

    import torch.distributed as dist

    from moe_kernels import get_kernels
    from launch.trainer.recipe import TrainConfig
    from launch.trainer.step import train_step
    from parallel import emulated_links
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime

    init_rank(rank, world, store)
    cfg = model_config(args.hidden, args.seq, args.experts, args.topk)
    links, _ = link_settings(args)
    t = TrainConfig(grad_accum=args.micro_batches, micro_batch_size=args.batch, seq_len=args.seq, grad_clip=1.0)
    runs = []
    for label, emulated, overlap, bucket_mb, fb in CONFIGS:
        stages = dict(pp=args.pp, pp_stage_layers=[2, 1]) if args.pp == 2 else {}
        par = ParallelConfig(ep=world // args.pp, devices_per_node=args.devices_per_node,
                             emulate_links=links if emulated else None, overlap=overlap,
                             grad_bucket_mb=bucket_mb if args.pp == 1 else 0.0, fb_overlap=fb, **stages)
        rt = ParallelRuntime.setup(par, cfg, micro_batches=args.micro_batches)
        torch.manual_seed(0)
        model = rt.parallelize(rt.build_model(cfg, get_kernels("fast")))
        rt.attach_pipeline(model, args.micro_batches, args.batch, args.seq)
        runs.append((label, par, model, rt, torch.optim.AdamW(model.parameters(), lr=1e-3), []))
    g = torch.Generator().manual_seed(1 + rank)
    data = torch.randint(0, 256, (args.micro_batches, args.batch, args.seq + 1), generator=g)
    micro = [{"tokens": x[:, :-1], "labels": x[:, 1:]} for x in data]
    for step in range(args.warmup + args.steps):
        for label, par, model, rt, opt, rows in runs:
            # every runtime installs its links at set-up: re-install this one's
            emulated_links.install(par.emulate_links, rt.layout.node_of, rank)
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, iter(micro), t, "cpu", grad_reducer=rt.grad_reducer,
                       pipeline=rt.forward_backward, backward_lane=rt.backward_lane)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            exposure = emulated_links.take_exposure()
            mine = torch.tensor([exposure.hidden_s, exposure.exposed_s, exposure.charged_s], dtype=torch.float64)
            dist.all_reduce(mine)
            if step >= args.warmup:
                rows.append((float(elapsed), *(mine / world).tolist()))
    for *_, rt, _, _ in runs:
        if rt.backward_lane is not None:
            rt.backward_lane.close()
    if rank == 0:
        queue.put([(label, rows) for label, *_, rows in runs])
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(ap, steps=8)
    ap.set_defaults(world=2, devices_per_node=1, batch=2, hidden=256)
    ap.add_argument("--micro-batches", type=int, default=4, help="train.grad_accum (default 4)")
    ap.add_argument("--pp", type=int, default=1, choices=(1, 2),
                    help="pipeline stages (2: layers [2, 1]; ep = world / pp; gradients reduced after backward)")
    add_link_args(ap, 0.2, 0.05)
    args = ap.parse_args()
    results = spawn(_rank, args.world, args)

    print(f"{machine()}; {args.world} ranks = pp {args.pp} x ep {args.world // args.pp} over {args.world // args.devices_per_node} nodes x "
          f"{args.devices_per_node}; {link_settings(args)[1]}; {args.micro_batches} micro-batches of {args.batch}x{args.seq} "
          f"tokens per rank, D={args.hidden}, E={args.experts}, top-{args.topk}, 2 MoE layers; medians of "
          f"{args.steps} steps")
    med = {label: [statistics.median(r[i] for r in rows) for i in range(4)] for label, rows in results}
    free, plain = med[CONFIGS[0][0]][0], med[CONFIGS[1][0]][0]
    comm = plain - free
    print(f"communication share of the non-overlapped step: {100 * comm / plain:.0f} % "
          f"({1000 * comm:.1f} of {1000 * plain:.1f} ms)")
    print("| configuration | step time | vs no overlap | hidden of the communication (step times) "
          "| emulated link time | exposed (runtime) | 1 - exposed / link time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (step, hidden, exposed, charged) in med.items():
        by_time = (plain - step) / comm if comm > 0 and label != CONFIGS[0][0] else float("nan")
        inside = 1 - exposed / charged if charged > 0 else float("nan")
        print(f"| {label} | {1000 * step:.1f} ms | {plain / step:.2f}x | {100 * by_time:.0f} % | {1000 * charged:.1f} ms "
              f"| {1000 * exposed:.1f} ms | {100 * inside:.0f} % |")


if __name__ == "__main__":
    main()
