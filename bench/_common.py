"""What the multi-process CPU benchmarks share (bench_dispatchers.py, bench_links.py,
bench_auto_dispatch.py): their command-line sizes, the small MoE they train, starting gloo ranks
on one box, one configuration's model / runtime / optimizer, and one timed training step.

A step is forward + backward + gradient reduction + AdamW on this rank's micro-batch; its time is
the slowest rank's (a step ends for everyone when the last rank is done). Each benchmark builds
all its configurations up front and runs them in turns, step by step, so drift in a shared
machine's load hits all alike.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_size_args(ap, steps: int = 10, warmup: int = 2, topk: bool = True) -> None:
    """The options every one of these benchmarks takes: ranks, nodes, steps, batch and model size."""
    ap.add_argument("--world", type=int, default=4, help="processes = ep (default 4)")
    ap.add_argument("--devices-per-node", type=int, default=2, help="ranks per emulated node (default 2)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    if topk:
        ap.add_argument("--topk", type=int, default=4)


def add_link_args(ap, intra_bw: float, inter_bw: float) -> None:
    """The emulated links' options (parallel.emulate_links): bandwidth and latency per link class."""
    ap.add_argument("--intra-bw", type=float, default=intra_bw, help=f"GB/s inside a node (default {intra_bw})")
    ap.add_argument("--inter-bw", type=float, default=inter_bw, help=f"GB/s between nodes (default {inter_bw})")
    ap.add_argument("--intra-lat", type=float, default=10.0, help="us per step inside a node")
    ap.add_argument("--inter-lat", type=float, default=50.0, help="us per step between nodes")


def link_settings(args):
    """The `EmulateLinks` of `add_link_args`'s options, and their one-line description."""
    from parallel.config import EmulateLinks, LinkSpec
    links = EmulateLinks(intra_node=LinkSpec(args.intra_lat, args.intra_bw), inter_node=LinkSpec(args.inter_lat, args.inter_bw))
    return links, (f"emulated links: intra {args.intra_bw} GB/s {args.intra_lat} us, inter {args.inter_bw} GB/s "
                   f"{args.inter_lat} us")


def model_config(hidden: int, seq: int, experts: int, topk: int, expert_ffn: int = 0):
    """The benchmarks' MoE: 3 layers (1 dense, 2 MoE with a shared expert), MLA attention, no
    auxiliary loss (routing is left as it comes). `expert_ffn` 0: the hidden size."""
    from moe.config import ModelConfig
    return ModelConfig(vocab_size=256, hidden_size=hidden, num_layers=3, first_k_dense=1, max_seq_len=seq,
                       num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32, dense_ffn_size=4 * hidden, num_experts=experts, top_k=topk,
                       expert_ffn_size=expert_ffn or hidden, num_shared_experts=1, aux_loss_coeff=0.0)


def init_rank(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)  # ranks share the box's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def build_run(cfg, par):
    """(model, runtime, optimizer) of one configuration, the model from seed 0 on every run."""
    from moe_kernels import get_kernels
    from moe.model import MoETransformer
    from parallel.runtime import ParallelRuntime
    torch.manual_seed(0)
    model = MoETransformer(cfg, get_kernels("fast"))
    rt = ParallelRuntime.setup(par, cfg)
    rt.parallelize(model)
    return model, rt, torch.optim.AdamW(model.parameters(), lr=1e-3)


def rank_tokens(rank: int, batch: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1 + rank)
    return torch.randint(0, 256, (batch, seq + 1), generator=g)


def timed_step(model, rt, opt, tokens: torch.Tensor) -> float:
    """One training step after a barrier; the slowest rank's seconds (a collective)."""
    import torch.distributed as dist
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
    return float(elapsed)


def spawn(target, world: int, args):
    """Run `target(rank, world, store, args, queue)` on `world` processes; what rank 0 puts."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, world, f"{tmp}/store", args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        while queue.empty():  # a rank that died would leave rank 0 (and this) waiting forever
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.kill()
                raise SystemExit(f"a benchmark rank failed (exit codes {failed}); see its traceback above")
            if all(p.exitcode == 0 for p in procs) and queue.empty():
                raise SystemExit("every benchmark rank exited without rank 0 reporting a result")
            time.sleep(0.5)
        result = queue.get()
        for p in procs:
            p.join()
    return result


def machine() -> str:
    return f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo"
