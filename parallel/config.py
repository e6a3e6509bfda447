"""The parallel layout of a run, as a typed config shared by the runtime and the simulator.

`validate()` checks the fields on their own (from the YAML loader); `check_world()` checks the layout
against a world size and a model shape, and is called before any process group is created, so every
inconsistency is one `ConfigError` naming the field to change, not a hang inside a collective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from config import ConfigError

if TYPE_CHECKING:
    from moe.config import ModelConfig

DISPATCHERS = ("local", "allgather", "alltoall", "hierarchical")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    tp_extend_ep: bool = False  # MoE layers: TP ranks split experts instead of expert weights
    dispatcher: Literal["local", "allgather", "alltoall", "hierarchical"] = "alltoall"
    devices_per_node: int = 8  # node structure for the hierarchical all-to-all; a setting on CPU
    zero1: bool = False  # shard optimizer states over data-parallel ranks
    overlap: bool = True  # run the shared expert while the dispatch communication is in flight

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("tp", "pp", "ep", "cp", "devices_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        # The YAML loader checks the Literal already; this catches configs built in code.
        if self.dispatcher not in DISPATCHERS:
            raise ConfigError(f"{p}dispatcher: unknown dispatcher {self.dispatcher!r}; "
                              f"allowed: {', '.join(repr(d) for d in DISPATCHERS)}")

    @property
    def expert_parallel(self) -> int:
        """Ranks the experts of one MoE layer are split over (TP-extend-EP folds the TP ranks in)."""
        return self.ep * self.tp if self.tp_extend_ep else self.ep

    @property
    def expert_tp(self) -> int:
        """Ranks each expert's weights are split over."""
        return 1 if self.tp_extend_ep else self.tp

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tp * self.cp * self.pp)

    def check_world(self, world_size: int, model: Optional["ModelConfig"] = None, path: str = "parallel") -> None:
        """Raise ConfigError unless this layout tiles `world_size` ranks (and fits `model`)."""
        self.validate(path)
        p = f"{path}." if path else ""
        dense = self.tp * self.cp * self.pp
        if world_size % dense:
            raise ConfigError(f"{p}tp: world size {world_size} is not a multiple of tp*cp*pp = "
                              f"{self.tp}*{self.cp}*{self.pp} = {dense}; change tp/cp/pp or the number of processes")
        dp = world_size // dense
        stage = dp * self.cp * self.tp  # ranks of one pipeline stage: both sides tile them
        ep_size = self.expert_parallel
        if stage % (ep_size * self.expert_tp):
            what = f"ep*tp = {ep_size}" if self.tp_extend_ep else f"ep = {self.ep}"
            raise ConfigError(f"{p}ep: {what} does not divide the {stage} ranks of a pipeline stage "
                              f"(world size {world_size} / pp {self.pp}); choose ep among {_divisors(stage // self.expert_tp)} "
                              f"or start a multiple of {self.pp * math.lcm(ep_size * self.expert_tp, self.tp * self.cp)} processes")
        if model is not None and model.num_experts % ep_size:
            raise ConfigError(f"{p}ep: model.num_experts={model.num_experts} is not divisible by "
                              f"{'ep*tp' if self.tp_extend_ep else 'ep'}={ep_size}; choose ep among "
                              f"{_divisors(model.num_experts)}")
        if model is not None and self.tp > 1:
            self._check_tp_split(model, p)
        if world_size > self.devices_per_node and world_size % self.devices_per_node:
            raise ConfigError(f"{p}devices_per_node: {self.devices_per_node} does not divide the world size "
                              f"{world_size}; set it to the number of ranks on each node")
        if self.dispatcher == "local" and ep_size > 1:
            raise ConfigError(f"{p}dispatcher: 'local' keeps every expert on every rank, but ep={ep_size}; "
                              "use 'alltoall', 'allgather' or 'hierarchical', or set ep: 1")
        if self.dispatcher == "hierarchical" and ep_size > 1:
            node = self.devices_per_node
            if self.expert_tp != 1:
                raise ConfigError(f"{p}dispatcher: 'hierarchical' needs contiguous EP groups; "
                                  "set tp_extend_ep: true or tp: 1")
            if ep_size % node and node % ep_size:
                raise ConfigError(f"{p}devices_per_node: the hierarchical dispatcher needs each EP group to "
                                  f"fill whole nodes or fit inside one; ep={ep_size} and devices_per_node="
                                  f"{node} do not divide one another")

    def _check_tp_split(self, model: "ModelConfig", p: str) -> None:
        """Every width that tensor parallelism splits must divide evenly over the tp ranks."""
        tp = self.tp
        widths = [("model.num_heads", model.num_heads, "")]
        if model.attention == "gqa":
            widths.append(("model.num_kv_heads", model.num_kv_heads, ""))
        moe = model.num_moe_layers > 0
        if model.first_k_dense > 0 or (model.mtp_layers > 0 and not moe):  # some layer has a dense MLP
            widths.append(("model.dense_ffn_size", model.dense_ffn_size, ""))
        if moe and model.num_shared_experts > 0:
            widths.append(("the shared experts' width model.num_shared_experts*expert_ffn_size",
                           model.num_shared_experts * model.expert_ffn_size, ""))
        if moe and not self.tp_extend_ep:
            widths.append(("model.expert_ffn_size", model.expert_ffn_size,
                           ", or set tp_extend_ep: true (TP ranks then split experts, not their weights)"))
        for what, n, alternative in widths:
            if n % tp:
                raise ConfigError(f"{p}tp: {what}={n} is not divisible by tp={tp}; choose tp among "
                                  f"{_divisors(n)}{alternative}")
