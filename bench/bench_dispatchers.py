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
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = [  # (label, dispatcher, overlap)
    ("alltoall", "alltoall", True),
    ("alltoall, no overlap", "alltoall", False),
    ("allgather", "allgather", True),
    ("hierarchical", "hierarchical", True),
]


def _rank(rank: int, world: int, store: str, args, queue) -> None:
    import torch.distributed as dist

    from kernels import get_kernels
    from moe.config import ModelConfig
    from moe.model import MoETransformer
    from parallel.config import ParallelConfig
    from parallel.runtime import ParallelRuntime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=3, first_k_dense=1, max_seq_len=args.seq,
                      num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, dense_ffn_size=4 * args.hidden, num_experts=args.experts, top_k=args.topk,
                      expert_ffn_size=args.hidden, num_shared_experts=1, aux_loss_coeff=0.0)
    runs = []
    for label, dispatcher, overlap in CONFIGS:
        torch.manual_seed(0)
        model = MoETransformer(cfg, get_kernels("fast"))
        rt = ParallelRuntime.setup(ParallelConfig(ep=world, dispatcher=dispatcher, overlap=overlap,
                                                  devices_per_node=args.devices_per_node), cfg)
        rt.parallelize(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        runs.append((label, model, rt, opt, []))
    g = torch.Generator().manual_seed(1 + rank)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    for step in range(args.warmup + args.steps):
        for label, model, rt, opt, times in runs:
            rt.stats.reset()
            dist.barrier()
            t0 = time.perf_counter()
            out = model(tokens[:, :-1], tokens[:, 1:])
            out.loss.backward()
            rt.grad_reducer(None, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            metrics = rt.step_metrics()
            if step >= args.warmup:
                times.append((float(elapsed), metrics["comm_intra_node_bytes"], metrics["comm_inter_node_bytes"],
                              metrics["ep_recv_imbalance"]))
    if rank == 0:
        queue.put([(label, times) for label, _, _, _, times in runs])
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4, help="processes = ep (default 4)")
    ap.add_argument("--devices-per-node", type=int, default=2, help="ranks per simulated node (default 2)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
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
