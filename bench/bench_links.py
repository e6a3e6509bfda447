"""Benchmark: MoE training steps on a CPU box under emulated links (parallel.emulate_links), where
the inter-node link is several times slower than the intra-node one: flat all-to-all vs the
hierarchical dispatcher, each with the blocking gradient reduction and with the overlapped one
(parallel.grad_bucket_mb), in one run.

Four gloo processes form 2 "nodes" of 2 ranks (ep = 4, top-4 of 16 experts). Every configuration
gets its own model, process groups and optimizer; they take turns step by step so drift in a shared
machine's load hits all alike. A step is forward + backward + gradient reduction + AdamW; its time is
the slowest rank's. Communication hidden / exposed comes from the runtime's own timestamps
(step metrics `comm_*`): hidden = in flight while other work ran, exposed = waited for.

    python bench/bench_links.py --steps 10 --warmup 2
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

CONFIGS = [  # (label, dispatcher, grad_bucket_mb)
    ("alltoall", "alltoall", 0.0),
    ("hierarchical", "hierarchical", 0.0),
    ("alltoall + overlapped grads", "alltoall", 0.25),
    ("hierarchical + overlapped grads", "hierarchical", 0.25),
]


def _rank(rank: int, world: int, store: str, args, queue) -> None:
    import torch.distributed as dist

    from kernels import get_kernels
    from moe.config import ModelConfig
    from moe.model import MoETransformer
    from parallel import emulated_links
    from parallel.config import EmulateLinks, LinkSpec, ParallelConfig
    from parallel.runtime import ParallelRuntime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=3, first_k_dense=1, max_seq_len=args.seq,
                      num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, dense_ffn_size=4 * args.hidden, num_experts=args.experts, top_k=args.topk,
                      expert_ffn_size=args.hidden, num_shared_experts=1, aux_loss_coeff=0.0)
    links = EmulateLinks(intra_node=LinkSpec(args.intra_lat, args.intra_bw), inter_node=LinkSpec(args.inter_lat, args.inter_bw))
    runs = []
    for label, dispatcher, bucket_mb in CONFIGS:
        torch.manual_seed(0)
        model = MoETransformer(cfg, get_kernels("fast"))
        par = ParallelConfig(ep=world, dispatcher=dispatcher, devices_per_node=args.devices_per_node,
                             emulate_links=links, grad_bucket_mb=bucket_mb)
        rt = ParallelRuntime.setup(par, cfg)
        rt.parallelize(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs.append((label, model, rt, opt, []))
    g = torch.Generator().manual_seed(1 + rank)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    for step in range(args.warmup + args.steps):
        for label, model, rt, opt, rows in runs:
            # every runtime installs its links at set-up: re-install this one's (same links, its node map)
            emulated_links.install(links, rt.layout.node_of, rank)
            rt.stats.reset()
            dist.barrier()
            t0 = time.perf_counter()
            out = model(tokens[:, :-1], tokens[:, 1:])
            out.loss.backward()
            rt.grad_reducer(None, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = torch.tensor([time.perf_counter() - t0])
            exposure = emulated_links.take_exposure()
            ar = exposure.by_kind.get("all_reduce", [0.0, 0.0])
            mine = torch.tensor([exposure.hidden_s, exposure.exposed_s, exposure.charged_s, ar[0], ar[1]],
                                dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            dist.all_reduce(mine)
            metrics = rt.step_metrics()
            if step >= args.warmup:
                rows.append((float(elapsed), *(mine / world).tolist(), metrics["comm_inter_node_bytes"]))
    if rank == 0:
        queue.put([(label, rows) for label, _, _, _, rows in runs])
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4, help="processes = ep (default 4)")
    ap.add_argument("--devices-per-node", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--intra-bw", type=float, default=0.04, help="GB/s inside a node (default 0.04)")
    ap.add_argument("--inter-bw", type=float, default=0.005, help="GB/s between nodes (default 0.005: 8x slower)")
    ap.add_argument("--intra-lat", type=float, default=10.0, help="us per step inside a node")
    ap.add_argument("--inter-lat", type=float, default=50.0, help="us per step between nodes")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, args.world, f"{tmp}/store", args, queue)) for r in range(args.world)]
        for p in procs:
            p.start()
        results = queue.get()
        for p in procs:
            p.join()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo; "
          f"{args.world} ranks = ep {args.world} over {args.world // args.devices_per_node} nodes x "
          f"{args.devices_per_node}; emulated links: intra {args.intra_bw} GB/s {args.intra_lat} us, inter "
          f"{args.inter_bw} GB/s {args.inter_lat} us; per rank {args.batch}x{args.seq} tokens, D={args.hidden}, "
          f"E={args.experts}, top-{args.topk}, 2 MoE layers; medians of {args.steps} steps (mean over ranks)")
    base = statistics.median(r[0] for r in results[0][1])
    print("| configuration | step time | vs alltoall | emulated comm | hidden | exposed | hidden fraction "
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
