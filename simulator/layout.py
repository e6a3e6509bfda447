"""The parallel layout the simulator evaluates, its divisibility rules, and the quantities they imply.

`Layout` is the runtime's `parallel.config.ParallelConfig` (the same fields, the same rules through
`ParallelConfig.check_world`, virtual pipeline stages included) plus what only the simulator
varies today: micro-batching, recomputation, swapping and optimizer offload. Its defaults describe a large
cluster run (ZeRO-1 and sequence parallelism on, devices per node from the hardware profile). So a
simulated layout maps onto a runtime recipe's `parallel:` section field by field
(`Layout.parallel()`), and a layout the trainer rejects is rejected here with the same message. The
data-parallel size is not a field: it follows from the cluster size, dp = num_devices / (tp*cp*pp).

Rank order: `rank_order` numbers the ranks as the runtime does (parallel/layout.py; Megatron's
tp-cp-dp by default, so a TP group is contiguous and an EP group of size ep has stride etp), and
`Derived.strides` holds the rank distance within each kind of group that the costs use.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

from config import ConfigError
from moe.config import ModelConfig
from parallel.config import DEFAULT_RANK_ORDER, ParallelConfig, check_pipeline
from parallel.layout import group_strides
from parallel.pipeline_layout import stage_sizes
from parallel.memory_config import MemoryConfig, simulator_policy


@dataclass
class Layout(ParallelConfig):
    sequence_parallel: bool = True
    zero1: bool = True
    devices_per_node: Optional[int] = None  # None = the hardware profile's value
    # simulator-only: they move into ParallelConfig as the runtime gains each feature
    micro_batch_size: int = 1  # sequences per micro-batch
    global_batch_size: int = 1  # sequences per optimizer step, over all data-parallel ranks
    seq_len: int = 4096
    # coarse memory policy; `memory()` is the runtime MemoryConfig each value stands for
    recompute: Literal["none", "selective", "full"] = "none"
    swap: bool = False  # swap selected activations to host memory, prefetch for backward
    optimizer_offload: bool = False  # optimizer states and step on the host
    # a recipe's whole `memory:` section (validate's memory cases): the activation formulas then read
    # it kind by kind; the coarse fields above must be its summary (they drive the time model)
    memory_policy: Optional[MemoryConfig] = None

    def validate(self, path: str = "") -> None:
        super().validate(path)
        p = f"{path}." if path else ""
        for name in ("micro_batch_size", "global_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        self.memory()  # the coarse policy must name a runtime config
        if self.memory_policy is not None:
            self.memory_policy.validate(f"{p}memory_policy")
            coarse = (self.recompute, self.swap, self.optimizer_offload)
            if coarse != self.memory_policy.summary():
                raise ConfigError(f"{p}recompute/swap/optimizer_offload: {coarse} do not summarise memory_policy "
                                  f"(which gives {self.memory_policy.summary()}); set them to its summary()")

    def memory(self) -> MemoryConfig:
        """The runtime's `memory:` section: `memory_policy` when given, else the one this layout's
        coarse recompute/swap/offload fields stand for (parallel/memory_config.py holds the mapping,
        so both sides mean the same module kinds)."""
        if self.memory_policy is not None:
            return self.memory_policy
        return simulator_policy(self.recompute, self.swap, self.optimizer_offload)

    def parallel(self, devices_per_node: int) -> ParallelConfig:
        """The runtime's `parallel:` section for this layout (`devices_per_node` fills an unset one)."""
        shared = {f.name: getattr(self, f.name) for f in fields(ParallelConfig)}
        if shared["devices_per_node"] is None:
            shared["devices_per_node"] = devices_per_node
        shared["sequence_parallel"] = self.sequence_parallel and self.tp > 1  # the runtime refuses it without TP
        return ParallelConfig(**shared)

    def short(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        parts.append(f"ep{self.ep}" + ("x" if self.tp_extend_ep else ""))
        if self.expert_tp != self.tp and not self.tp_extend_ep:
            parts.append(f"etp{self.expert_tp}")
        if self.tp > 1 and not self.sequence_parallel:
            parts.append("nosp")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        parts += [f"mbs{self.micro_batch_size}", self.recompute[:3]]
        if self.swap:
            parts.append("swap")
        if self.optimizer_offload:
            parts.append("offload")
        if not self.zero1:
            parts.append("nozero")
        if self.rank_order != DEFAULT_RANK_ORDER:
            parts.append(self.rank_order.replace("-", ""))
        parts.append(self.dispatcher[:4])
        return "-".join(parts)


@dataclass
class Derived:
    """Quantities a valid layout implies for a given model and cluster."""

    num_devices: int
    devices_per_node: int
    dp: int
    ep: int  # effective expert-parallel size (tp * ep under tp_extend_ep)
    etp: int
    edp: int  # expert-data-parallel size: replicas of each expert
    micro_batches: int  # per pipeline, per step
    noop_layers: int  # model's own plus padding for stage balance
    layers_per_chunk: int  # transformer layers (incl. no-op) per virtual stage; the largest one's with pp_stage_layers
    experts_per_rank: int
    strides: dict  # kind -> rank distance between neighbours of such a group (parallel/layout.py)


def derive(model: ModelConfig, lay: Layout, num_devices: int, devices_per_node: int,
           pad_layers: bool = True) -> Derived:
    """Check the divisibility rules; return the derived sizes or raise one ConfigError naming the field."""
    if num_devices < 1:
        raise ConfigError(f"num_devices: must be >= 1, got {num_devices}")
    dpn = lay.devices_per_node or devices_per_node
    if lay.dispatcher == "auto":
        raise ConfigError("layout.dispatcher: 'auto' is the trainer's choice (made with this simulator); a "
                          "layout is costed with one dispatcher: name alltoall, hierarchical or allgather, or "
                          "compare them with `simulator search`")
    lay.check_world(num_devices, model, "layout", devices_per_node=dpn)
    dp = lay.data_parallel(num_devices)
    ep, etp = lay.expert_parallel, lay.expert_tp
    side = lay.tp * lay.cp * dp  # ranks per pipeline stage
    shard = (lay.tp if lay.sequence_parallel or lay.tp_extend_ep else 1) * lay.cp
    if lay.seq_len % shard:
        raise ConfigError(f"layout.seq_len: {lay.seq_len} is not divisible by {shard} (tp*cp: sequence "
                          f"parallelism or TP-extend-EP split the sequence over the TP ranks)")
    if lay.seq_len > model.max_seq_len:
        raise ConfigError(f"layout.seq_len: {lay.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    per_step = lay.micro_batch_size * dp
    if lay.global_batch_size % per_step:
        raise ConfigError(f"layout.global_batch_size: {lay.global_batch_size} is not divisible by "
                          f"micro_batch_size*dp={per_step}; pick a multiple of {per_step}")
    m = lay.global_batch_size // per_step
    if lay.pp > 1 and m < lay.pp:
        raise ConfigError(f"layout.global_batch_size: {m} micro-batches per pipeline is fewer than pp={lay.pp}; "
                          f"raise global_batch_size or lower micro_batch_size/pp")
    if lay.vpp > 1 and m % lay.pp:
        raise ConfigError(f"layout.vpp: the interleaved schedule needs micro-batches ({m}) divisible by "
                          f"pp={lay.pp}")
    chunks = lay.pp * lay.vpp
    total = model.num_layers + model.noop_layers
    noop = model.noop_layers
    if lay.pp_stage_layers is not None:  # explicit stages: the runtime's rules, nothing padded
        check_pipeline(lay, model, path="layout")
    elif total % chunks:
        if not pad_layers:
            raise ConfigError(f"layout.pp: {total} layers do not split into pp*vpp={chunks} equal stages; "
                              f"set model.noop_layers to {-total % chunks + model.noop_layers} or change pp/vpp")
        noop += -total % chunks
    return Derived(num_devices=num_devices, devices_per_node=dpn, dp=dp, ep=ep, etp=etp,
                   edp=side // (ep * etp), micro_batches=m, noop_layers=noop,
                   layers_per_chunk=max(r + n for r, n in stage_sizes(lay.pp, lay.vpp, model.num_layers, noop,
                                                                      lay.pp_stage_layers)),
                   experts_per_rank=model.num_experts // ep,
                   strides=group_strides(lay.tp, lay.cp, dp, ep, etp, lay.rank_order))
