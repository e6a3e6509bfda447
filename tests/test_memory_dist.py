"""Memory policies under parallelism and in the trainer (issue 12): on 2 gloo ranks with expert
parallelism (ep2, all-to-all), with ZeRO-1 (dp2) and with tp2 under sequence parallelism (expert TP,
TP-extend-EP), recompute, swap and optimizer offload give the policy-free run's losses and parameters
bitwise (a recomputed MoE layer, or a recomputed dispatch under `moe_permute`, re-runs its token
exchange in backward; `moe_permute` also under the all-gather and hierarchical dispatchers); the
optimizer offload with torch's AdamW matches the on-device optimizer;
the trainer applies a recipe's memory section and logs the measured bytes in metrics.jsonl."""
from __future__ import annotations

import functools
import json
from dataclasses import replace

import pytest
import torch

from dist_utils import run_distributed
from parallel.memory_config import MemoryConfig

SELECTIVE = dict(recompute=["norm", "swiglu", "mla_up"], swap=["attention", "expert_ffn", "mlp"])
POLICIES = {
    "none": MemoryConfig(),
    "selective+swap": MemoryConfig(**SELECTIVE),
    "layer": MemoryConfig(recompute=["layer"]),
    "expert_ffn+full1+swap-attn": MemoryConfig(recompute=["expert_ffn"], full_layers=1, swap=["attention"]),
    "moe_permute": MemoryConfig(recompute=["moe_permute"]),
    "offload": MemoryConfig(optimizer_offload=True, offload_chunk_mb=0.01),
    "offload+selective+swap": MemoryConfig(optimizer_offload=True, **SELECTIVE),
}
LAYOUTS = {"ep2": dict(ep=2, dispatcher="alltoall"), "ep2-zero1": dict(ep=2, dispatcher="alltoall", zero1=True),
           "dp2-zero1": dict(ep=1, dispatcher="local", zero1=True),
           "tp2-sp": dict(tp=2, dispatcher="local", sequence_parallel=True),
           "tp2-extend-sp": dict(tp=2, tp_extend_ep=True, dispatcher="alltoall", sequence_parallel=True)}


def _worker(layouts: dict, policies: dict) -> dict:
    from test_parallel_equivalence import adamw, build, global_batches
    from parallel.config import ParallelConfig
    from parallel.memory import MemoryManager
    from parallel.offload import offload_optimizer
    from parallel.runtime import ParallelRuntime
    out = {}
    for lname, par in layouts.items():
        for pname, mem in policies.items():
            model = build(dict(expert_bias=True, bias_update_speed=0.05, score_func="sigmoid"))
            rt = ParallelRuntime.setup(ParallelConfig(**par), model.cfg)
            rt.parallelize(model)
            mm = MemoryManager(model, mem)
            opt = rt.wrap_optimizer(adamw(model), model)
            if mem.optimizer_offload:
                opt = offload_optimizer(opt, mem)
            b = 8 // rt.dp_size
            losses, metrics = [], None
            for step in global_batches():
                tokens = step[rt.dp_rank * b:(rt.dp_rank + 1) * b]
                with mm.step(model):
                    res = model(tokens[:, :-1], tokens[:, 1:])
                    res.loss.backward()
                    rt.grad_reducer(None, 0.2)
                    opt.step()
                metrics = mm.metrics(model, opt)
                opt.zero_grad(set_to_none=True)
                model.update_expert_bias()
                losses.append(res.loss.detach())
            out[(lname, pname)] = {"loss": losses, "metrics": metrics,
                                   "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                                   "bias": [m.router.expert_bias.clone() for m in model.moe_layers()]}
    return out


# moe_permute under the other EP dispatchers (the all-to-all one is in LAYOUTS): each re-runs its own
# exchanges in backward (all-gather: tokens, routing and weights; hierarchical: inter-node all-to-all
# then the intra-node one), with overlap on (the default) so the re-run exchanges are asynchronous;
# and under the two TP wrappers of a dispatcher (expert TP; TP-extend-EP, which splits the tokens).
PERMUTE_LAYOUTS = {"ep2-allgather": dict(ep=2, dispatcher="allgather"),
                   "ep2-hier-2x1": dict(ep=2, dispatcher="hierarchical", devices_per_node=1),
                   "tp2-expert-tp": dict(tp=2, dispatcher="local"),
                   "tp2-extend-ep": dict(tp=2, tp_extend_ep=True, dispatcher="alltoall")}
PERMUTE_POLICIES = {"none": MemoryConfig(), "moe_permute": MemoryConfig(recompute=["moe_permute"])}


@functools.lru_cache(maxsize=None)
def results() -> list:
    return run_distributed(_worker, 2, LAYOUTS, POLICIES, timeout=240)


@functools.lru_cache(maxsize=None)
def permute_results() -> list:
    return run_distributed(_worker, 2, PERMUTE_LAYOUTS, PERMUTE_POLICIES, timeout=240)


def assert_same_run(got: dict, ref: dict, what: str) -> None:
    for step, (a, b) in enumerate(zip(got["loss"], ref["loss"])):
        assert torch.equal(a, b), f"{what} step {step}: loss {a} vs {b}"
    for name, p in ref["params"].items():
        assert torch.equal(got["params"][name], p), f"{what}: {name}"
    for a, b in zip(got["bias"], ref["bias"]):
        assert torch.equal(a, b), f"{what}: expert bias"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_policies_match_the_policy_free_run_bitwise_under_ep_and_zero1(layout):
    for rank, res in enumerate(results()):
        ref = res[(layout, "none")]
        for pname in POLICIES:
            if pname == "none":
                continue
            got = res[(layout, pname)]
            assert_same_run(got, ref, f"rank {rank} {layout} {pname}")
            m = got["metrics"]
            if POLICIES[pname].optimizer_offload:  # the state left the device, this rank's shard only under ZeRO-1
                assert m["mem_optimizer_device_bytes"] == 0 and m["mem_optimizer_host_bytes"] > 0
            if POLICIES[pname].recompute or POLICIES[pname].swap:
                assert m["mem_saved_activation_peak_bytes"] < ref["metrics"]["mem_saved_activation_peak_bytes"]
    if layout == "ep2-zero1":  # ZeRO-1 + offload: each rank holds about half of the host state of ep2
        r0 = results()[0]
        full = r0[("ep2", "offload")]["metrics"]["mem_optimizer_host_bytes"]
        shard = r0[("ep2-zero1", "offload")]["metrics"]["mem_optimizer_host_bytes"]
        assert shard < 0.8 * full


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(PERMUTE_LAYOUTS))
def test_moe_permute_matches_the_policy_free_run_bitwise_under_every_dispatcher(layout):
    for rank, res in enumerate(permute_results()):
        ref, got = res[(layout, "none")], res[(layout, "moe_permute")]
        assert_same_run(got, ref, f"rank {rank} {layout} moe_permute")
        assert got["metrics"]["mem_saved_activation_peak_bytes"] < ref["metrics"]["mem_saved_activation_peak_bytes"]


def test_host_optimizer_matches_the_device_optimizer_bf16_autocast():
    """Offload with the torch fallback, bf16 autocast and a tiny chunk: within 1e-6 of on-device AdamW."""
    from moe_kernels import get_kernels
    from launch.trainer.recipe import TrainConfig
    from launch.trainer.setup import build_optimizer
    from moe.config import ModelConfig
    from moe.model import MoETransformer
    from parallel.offload import HostOffloadOptimizer, offload_optimizer
    from test_memory import PANGU
    finals = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig(**PANGU), get_kernels("fast"))
        opt = build_optimizer(model, TrainConfig(lr=1e-2))
        if offload:
            opt = offload_optimizer(opt, MemoryConfig(optimizer_offload=True, host_optimizer="torch",
                                                      offload_chunk_mb=0.001))
            assert isinstance(opt, HostOffloadOptimizer) and opt.backend == "AdamW"
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            tokens = torch.randint(0, 256, (2, 17), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], tokens[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    worst = max(float((finals[1][n] - p).abs().max()) for n, p in finals[0].items())
    assert worst <= 1e-6, worst


def test_deepspeed_cpu_adam_matches_torch_adamw():
    """Runs only where the deepspeed extra is installed (it compiles its CPU Adam op on first use)."""
    pytest.importorskip("deepspeed")
    from parallel.offload import HostOffloadOptimizer
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(3)]
    got = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    opt = HostOffloadOptimizer(torch.optim.AdamW(got, lr=1e-2, weight_decay=0.1), 1 << 20, kind="deepspeed")
    assert opt.backend == "DeepSpeedCPUAdam"
    for _ in range(3):
        for a, b in zip(ref, got):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, got):
        assert float((a - b).abs().max()) <= 1e-6


def test_trainer_applies_the_memory_section_and_logs_bytes(tmp_path):
    from launch.trainer.loop import run
    from test_train import _recipe
    base = _recipe(tmp_path, steps=2)
    mem = MemoryConfig(recompute=["norm", "swiglu", "mla_up"], swap=["attention", "expert_ffn"],
                       optimizer_offload=True)
    h_none = run(replace(base, train=replace(base.train, out_dir=str(tmp_path / "none"))), progress=False, log=False)
    h_mem = run(replace(base, memory=mem), progress=False)
    assert [h["loss"] for h in h_mem] == [h["loss"] for h in h_none]
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["mem_swapped_bytes"] > 0 and rec["mem_optimizer_device_bytes"] == 0
    assert rec["mem_saved_activation_peak_bytes"] < h_none[-1]["mem_saved_activation_peak_bytes"]


def test_offloaded_optimizer_resumes_from_a_checkpoint(tmp_path):
    """Save after 2 steps, resume to 4: the host masters follow the loaded weights (same losses)."""
    from launch.trainer.loop import run
    from test_train import _recipe
    base = _recipe(tmp_path, steps=4, lr=3e-3, min_lr=3e-3, warmup_steps=0)
    base = replace(base, memory=MemoryConfig(optimizer_offload=True, recompute=["norm"]))
    straight = run(replace(base, train=replace(base.train, out_dir=str(tmp_path / "straight"))), progress=False, log=False)
    first = replace(base, train=replace(base.train, steps=2, out_dir=str(tmp_path / "resumed")))
    run(first, progress=False, log=False)
    resumed = run(replace(first, train=replace(first.train, steps=4)), progress=False, log=False)
    assert resumed[-1]["loss"] == straight[-1]["loss"]
