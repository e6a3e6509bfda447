"""Benchmark: what each memory policy saves and costs, measured in one run on a Pangu-like tiny model
(MLA, sigmoid routing with aux-loss-free bias, shared expert, sandwich norm, MTP).

For every policy: saved activation bytes at the step's peak (saved-tensor hooks, unique storages,
parallel/memory.py), bytes swapped to host, and the median forward + backward + AdamW step time.
Policies take turns step by step, so drift in a shared machine's load hits all alike; ratios are
against `none` (measurement hooks on) and `none, unmeasured` shows the hooks' own cost.

    python bench/bench_memory.py --steps 8 --threads 1
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_kernels import get_kernels  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.model import MoETransformer  # noqa: E402
from parallel.memory import MemoryManager  # noqa: E402
from parallel.memory_config import MemoryConfig  # noqa: E402
from parallel.offload import offload_optimizer  # noqa: E402

MODEL = dict(vocab_size=256, hidden_size=128, num_layers=4, max_seq_len=256, num_heads=4, q_lora_rank=64,
             kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_ffn_size=384,
             first_k_dense=1, num_experts=8, top_k=2, expert_ffn_size=96, num_shared_experts=1,
             score_func="sigmoid", expert_bias=True, norm="sandwich", mtp_layers=1)
SELECTIVE = ["norm", "swiglu", "mla_up"]
SWAP = ["attention", "expert_ffn", "mlp"]
POLICIES = {
    "none": MemoryConfig(),
    "none, unmeasured": MemoryConfig(measure=False),
    "norm": MemoryConfig(recompute=["norm"]),
    "swiglu": MemoryConfig(recompute=["swiglu"]),
    "mla_up": MemoryConfig(recompute=["mla_up"]),
    "core_attention": MemoryConfig(recompute=["core_attention"]),
    "expert_ffn": MemoryConfig(recompute=["expert_ffn"]),
    "moe_permute": MemoryConfig(recompute=["moe_permute"]),
    "selective + moe_permute + swap attention+mlp": MemoryConfig(recompute=SELECTIVE + ["moe_permute"],
                                                                 swap=["attention", "mlp"]),
    "layer": MemoryConfig(recompute=["layer"]),
    "full_layers 2": MemoryConfig(full_layers=2),
    "swap attention+expert_ffn+mlp": MemoryConfig(swap=SWAP),
    "selective (norm+swiglu+mla_up)": MemoryConfig(recompute=SELECTIVE),
    "selective + swap": MemoryConfig(recompute=SELECTIVE, swap=SWAP),
    "optimizer offload": MemoryConfig(optimizer_offload=True),
}


def build(cfg: MemoryConfig):
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(**MODEL), get_kernels("fast"))
    mm = MemoryManager(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if cfg.optimizer_offload:
        opt = offload_optimizer(opt, cfg)
    return model, mm, opt


def step(model, mm, opt, tokens) -> tuple[float, dict, float]:
    t0 = time.perf_counter()
    with mm.step(model):
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    m = mm.metrics(model, opt)
    opt.zero_grad(set_to_none=True)
    return dt, m, float(out.loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {name: build(cfg) for name, cfg in POLICIES.items()}
    g = torch.Generator().manual_seed(1)
    times = {name: [] for name in POLICIES}
    mem, losses = {}, {name: [] for name in POLICIES}
    for s in range(args.steps + 1):  # step 0 warms up
        tokens = torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq + 1), generator=g)
        for name, (model, mm, opt) in runs.items():
            dt, m, loss = step(model, mm, opt, tokens)
            losses[name].append(loss)
            if s:
                times[name].append(dt)
                mem[name] = m
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}; "
          f"batch {args.batch} x seq {args.seq}; median of {args.steps} steps, policies alternating")
    base_t = statistics.median(times["none"])
    base_b = mem["none"]["mem_saved_activation_peak_bytes"]
    print("| policy | saved activations at peak | vs none | swapped to host | optimizer on device / host | "
          "step time | vs none | losses equal none |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in POLICIES:
        m, t = mem[name], statistics.median(times[name])
        act = m.get("mem_saved_activation_peak_bytes")
        saved = f"{act / 2**20:.2f} MiB" if act is not None else "(not measured)"
        ratio = f"-{1 - act / base_b:.0%}" if act is not None else ""
        swapped = f"{m['mem_swapped_bytes'] / 2**20:.2f} MiB" if m else ""
        opt = f"{m['mem_optimizer_device_bytes'] / 2**20:.2f} / {m['mem_optimizer_host_bytes'] / 2**20:.2f} MiB" if m else ""
        print(f"| {name} | {saved} | {ratio} | {swapped} | {opt} | {t * 1e3:.1f} ms | {t / base_t:.2f}x | "
              f"{losses[name] == losses['none']} |")


if __name__ == "__main__":
    main()
