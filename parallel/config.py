"""The parallel layout of a run, as a typed config shared by the runtime and the simulator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moe.config import ConfigError


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

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("tp", "pp", "ep", "cp", "devices_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
