"""`parallel.dispatcher: auto`: which token dispatcher the cost model predicts fastest for one run.

The trainer (launch/trainer/auto_dispatch.py) calls `choose_dispatcher` before it builds the
runtime; the runtime cannot import the simulator, so the choice is made here and handed over as a
plain dispatcher name. What is compared: one MoE layer, one micro-batch, forward + backward on
this rank, through the same per-layer costing as `simulator estimate` (simulator/layer_cost.py):
the dispatcher's local permutations, the expert GEMMs on the busiest rank, and its exchanges
message by message with the runtime's overlap rule (the shared expert's halves hide the dispatch and the combine). The
links are `parallel.emulate_links` when set (the runtime then charges exactly the link model the
simulator uses), else the profile's. Every MoE layer has the same shape, tokens and layout, so
one prediction covers all of them: the choice is per run.

Candidates are the dispatchers the runtime accepts for this layout (`ParallelConfig.check_world`);
ep = 1 has one, `local`. Ties go to the first of alltoall, hierarchical, allgather (the simplest).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from config import ConfigError
from moe.config import ModelConfig
from parallel.config import ParallelConfig
from simulator.hardware import HardwareProfile, load_hardware
from simulator.layer_cost import LayerCosts, SimOptions
from simulator.layout import Layout, derive

CANDIDATES = ("alltoall", "hierarchical", "allgather")  # in tie-break order
DEFAULT_PROFILE = {"cpu": "cpu_calibrated", "npu": "ascend_910b_a2", "cuda": "nvidia_h100"}


@dataclass
class DispatchChoice:
    dispatcher: str
    predicted_s: dict  # candidate -> seconds of one MoE layer's forward + backward per micro-batch
    rejected: dict  # dispatcher -> why the runtime cannot run it on this layout
    profile: str  # the hardware profile (and links) the prediction used

    def log_line(self) -> str:
        """One line for the training log: the choice and why."""
        if not self.predicted_s:
            return f"dispatcher: auto -> {self.dispatcher} ({self.rejected.get('why', '')})"
        ranked = sorted(self.predicted_s.items(), key=lambda kv: kv[1])
        times = ", ".join(f"{name} {1e3 * t:.3f} ms" for name, t in ranked)
        out = (f"dispatcher: auto -> {self.dispatcher}: predicted per MoE layer and micro-batch (fwd+bwd) "
               f"{times} [{self.profile}]")
        if self.rejected:
            out += "; not possible here: " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return out


def link_profile(parallel: ParallelConfig, device: str = "cpu") -> tuple[HardwareProfile, str]:
    """The profile the choice predicts with: `parallel.dispatcher_profile` or the device's default,
    its links replaced by `parallel.emulate_links` when set (and then no per-collective measured
    links: the emulation charges the two link classes only)."""
    name = parallel.dispatcher_profile or DEFAULT_PROFILE.get(device)
    if name is None:
        raise ConfigError(f"parallel.dispatcher_profile: no default hardware profile for device {device!r}; "
                          f"name one (e.g. {', '.join(DEFAULT_PROFILE.values())}) or a YAML path")
    try:
        hw = load_hardware(name)
    except ConfigError as e:
        raise ConfigError(f"parallel.dispatcher_profile: {e}") from None
    label = hw.name
    links = parallel.emulate_links
    hw = hw.with_emulated_links(links)
    if links is not None:
        label += (f", emulated links intra {links.intra_node.bandwidth_gbps:g} GB/s {links.intra_node.latency_us:g} us,"
                  f" inter {links.inter_node.bandwidth_gbps:g} GB/s {links.inter_node.latency_us:g} us")
    return hw, label


def _options(hw: HardwareProfile, dtype: str, imbalance: float) -> SimOptions:
    grouped_per_expert = False
    if hw.device == "cpu":  # as the trainer's fast kernels run: one grouped GEMM where torch has one
        import torch
        from moe_kernels.fast import grouped_mm_works
        grouped_per_expert = not grouped_mm_works("cpu", torch.float32 if dtype == "fp32" else torch.bfloat16)
    return SimOptions(dtype=dtype, expert_imbalance=imbalance, grouped_gemm_per_expert=grouped_per_expert)


def _check_inputs(world: int, micro_batch_size: int, seq_len: int, dtype: str, imbalance: float,
                  hw: HardwareProfile) -> None:
    if world < 1:
        raise ConfigError(f"world size: must be >= 1 processes, got {world}")
    for name, v in (("train.micro_batch_size", micro_batch_size), ("train.seq_len", seq_len)):
        if v < 1:
            raise ConfigError(f"{name}: must be >= 1, got {v}")
    if imbalance < 1:
        raise ConfigError(f"expert imbalance: is max/mean expert-rank load, so >= 1; got {imbalance}")
    if dtype not in hw.peak_tflops:
        raise ConfigError(f"train.dtype: dispatcher: auto predicts with profile {hw.name!r}, which has no peak "
                          f"for {dtype!r} (it lists {', '.join(hw.peak_tflops)}); set parallel.dispatcher_profile "
                          "to a profile that has, or name a dispatcher")


def choose_dispatcher(model: ModelConfig, parallel: ParallelConfig, world: int, micro_batch_size: int,
                      seq_len: int, device: str = "cpu", dtype: str = "fp32", imbalance: float = 1.0,
                      micro_batches: int = 1, hw: Optional[HardwareProfile] = None) -> DispatchChoice:
    """The dispatcher predicted fastest for `parallel` (its `dispatcher` field is ignored) on
    `world` ranks training micro-batches of `micro_batch_size` x `seq_len` tokens per rank, with
    expert load `imbalance` (max / mean over expert ranks) and `micro_batches` per step (the
    pipeline needs at least pp). `hw` replaces the looked-up profile."""
    label = hw.name if hw is not None else ""
    if hw is None:
        hw, label = link_profile(parallel, device)
    _check_inputs(world, micro_batch_size, seq_len, dtype, imbalance, hw)
    # the layout's own errors (world size, divisibility) as they are, before any candidate's
    replace(parallel, dispatcher="alltoall", dispatcher_profile=None).check_world(world, model)
    if parallel.expert_parallel == 1:
        return DispatchChoice("local", {}, {"why": "ep = 1: every rank holds every expert"}, label)
    if hw.device == "cpu" and world > 1 and world in hw.concurrency_slowdown:
        s = max(1.0, hw.concurrency_slowdown[world])  # ranks of one box share its cores
        hw = hw.scaled(s, s, s)
    costs = LayerCosts(model, hw.corrected(), _options(hw, dtype, imbalance))
    predicted, rejected = {}, {}
    for name in CANDIDATES:
        cfg = replace(parallel, dispatcher=name, dispatcher_profile=None)
        try:
            cfg.check_world(world, model)
        except ConfigError as e:
            rejected[name] = str(e).split(": ", 1)[-1]
            continue
        fields = {k: v for k, v in asdict(cfg).items() if k != "emulate_links"}
        lay = Layout(**fields, emulate_links=cfg.emulate_links, micro_batch_size=micro_batch_size,
                     seq_len=seq_len, recompute="none",
                     global_batch_size=micro_batch_size * micro_batches * cfg.data_parallel(world))
        d = derive(model, lay, world, cfg.devices_per_node or hw.devices_per_node, pad_layers=True)
        part = costs("moe", lay, d)
        predicted[name] = part.fwd(False) + part.bwd(False)
    if not predicted:
        raise ConfigError("parallel.dispatcher: auto found no dispatcher this layout can run: "
                          + "; ".join(f"{k}: {v}" for k, v in rejected.items()))
    best = min(predicted, key=lambda k: (predicted[k], CANDIDATES.index(k)))
    return DispatchChoice(best, predicted, rejected, label)
