"""The parallel layout the simulator evaluates, its divisibility rules, and the quantities they imply.

`Layout` uses the runtime's field names (`parallel.config.ParallelConfig`: tp, pp, ep, cp,
tp_extend_ep, dispatcher, devices_per_node, zero1) plus what only the simulator varies today
(virtual pipeline stages, micro-batching, recomputation, swapping, optimizer offload), so a
simulated layout maps onto a runtime recipe field by field. The data-parallel size is not a field: it
follows from the cluster size, dp = num_devices / (tp * cp * pp).

Rank order (innermost first), as in Megatron: attention side tp, cp, dp, pp; MoE side etp, ep, edp,
pp over the same ranks. So a TP group is contiguous, and an EP group of size ep has stride etp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from config import ConfigError
from moe.config import ModelConfig


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline chunks per stage (interleaved 1F1B when > 1)
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallelism; None = same as tp
    tp_extend_ep: bool = False  # MoE layers: the TP ranks split experts instead of expert weights
    sequence_parallel: bool = True  # with TP: split the tokens outside TP regions over the TP ranks
    cp: int = 1
    zero1: bool = True  # shard optimizer states (and master weights) over data-parallel ranks
    micro_batch_size: int = 1  # sequences per micro-batch
    global_batch_size: int = 1  # sequences per optimizer step, over all data-parallel ranks
    seq_len: int = 4096
    recompute: Literal["none", "selective", "full"] = "none"
    swap: bool = False  # swap selected activations to host memory, prefetch for backward
    optimizer_offload: bool = False  # optimizer states and step on the host
    dispatcher: Literal["local", "allgather", "alltoall", "hierarchical"] = "alltoall"
    devices_per_node: Optional[int] = None  # None = the hardware profile's value

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("tp", "pp", "vpp", "ep", "cp", "micro_batch_size", "global_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        if self.etp is not None and self.etp < 1:
            raise ConfigError(f"{p}etp: must be >= 1 (or null for etp = tp), got {self.etp}")
        if self.devices_per_node is not None and self.devices_per_node < 1:
            raise ConfigError(f"{p}devices_per_node: must be >= 1, got {self.devices_per_node}")
        if self.tp_extend_ep and self.etp not in (None, 1):
            raise ConfigError(f"{p}etp: tp_extend_ep splits experts over the TP ranks, so expert weights "
                              f"are not split; set etp to 1 or null, got {self.etp}")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"{p}vpp: interleaved stages need pp > 1; set vpp: 1 or raise pp")

    @property
    def expert_parallel(self) -> int:
        """Ranks the experts of one MoE layer are split over."""
        return self.ep * self.tp if self.tp_extend_ep else self.ep

    @property
    def expert_tp(self) -> int:
        if self.tp_extend_ep:
            return 1
        return self.tp if self.etp is None else self.etp

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
    layers_per_chunk: int  # transformer layers (incl. no-op) per virtual stage
    experts_per_rank: int


def derive(model: ModelConfig, lay: Layout, num_devices: int, devices_per_node: int,
           pad_layers: bool = True) -> Derived:
    """Check the divisibility rules; return the derived sizes or raise one ConfigError naming the field."""
    if num_devices < 1:
        raise ConfigError(f"num_devices: must be >= 1, got {num_devices}")
    dpn = lay.devices_per_node or devices_per_node
    model_par = lay.tp * lay.cp * lay.pp
    if num_devices % model_par:
        raise ConfigError(f"num_devices: {num_devices} is not divisible by tp*cp*pp={model_par} "
                          f"(tp={lay.tp}, cp={lay.cp}, pp={lay.pp}); change the layout or the cluster size")
    dp = num_devices // model_par
    if model.num_heads % lay.tp:
        raise ConfigError(f"layout.tp: num_heads={model.num_heads} is not divisible by tp={lay.tp}")
    if model.attention == "gqa" and model.num_kv_heads % lay.tp and lay.tp % model.num_kv_heads:
        raise ConfigError(f"layout.tp: num_kv_heads={model.num_kv_heads} and tp={lay.tp} must divide one another")
    ep, etp = lay.expert_parallel, lay.expert_tp
    if model.num_experts % ep:
        raise ConfigError(f"layout.ep: num_experts={model.num_experts} is not divisible by the expert-parallel "
                          f"size {ep}" + (" (ep * tp under tp_extend_ep)" if lay.tp_extend_ep else ""))
    if model.expert_ffn_size % etp:
        raise ConfigError(f"layout.etp: expert_ffn_size={model.expert_ffn_size} is not divisible by expert "
                          f"tensor parallelism {etp}")
    side = lay.tp * lay.cp * dp  # ranks per pipeline stage
    if side % (ep * etp):
        raise ConfigError(f"layout.ep: ep*etp={ep * etp} must divide tp*cp*dp={side} (the ranks of one "
                          f"pipeline stage); lower ep or raise dp")
    if lay.dispatcher == "local" and ep > 1:
        raise ConfigError(f"layout.dispatcher: 'local' needs ep == 1, got expert-parallel size {ep}; "
                          f"use alltoall, hierarchical or allgather")
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
    if total % chunks:
        if not pad_layers:
            raise ConfigError(f"layout.pp: {total} layers do not split into pp*vpp={chunks} equal stages; "
                              f"set model.noop_layers to {-total % chunks + model.noop_layers} or change pp/vpp")
        noop += -total % chunks
    return Derived(num_devices=num_devices, devices_per_node=dpn, dp=dp, ep=ep, etp=etp,
                   edp=side // (ep * etp), micro_batches=m, noop_layers=noop,
                   layers_per_chunk=(model.num_layers + noop) // chunks,
                   experts_per_rank=model.num_experts // ep)
