"""The `placement:` section of a recipe: dynamic expert placement (parallel/placement_runtime.py) and
the skewed-routing workload that makes it measurable on CPU (parallel/skew.py).

`validate()` checks the fields on their own (from the YAML loader); `check_recipe()` checks them
against the parallel layout, the model and the memory policy (from `Recipe.validate`), so a recipe
the runtime cannot place is one `ConfigError` naming the field and the fix, before any process group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from config import ConfigError

if TYPE_CHECKING:
    from moe.config import ModelConfig
    from parallel.config import ParallelConfig
    from parallel.memory_config import MemoryConfig


@dataclass
class SkewConfig:
    """Zipf expert popularity that drifts over steps, added to the router logits (CPU workload)."""
    enabled: bool = False
    alpha: float = 1.2  # Zipf exponent: popularity of the r-th expert ∝ 1 / r ** alpha (0: uniform)
    strength: float = 1.0  # logit bias = strength * log popularity
    period: int = 10  # steps between two popularity orders (interpolated in between)
    seed: int = 0

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        if self.alpha < 0:
            raise ConfigError(f"{p}alpha: must be >= 0 (0 is uniform popularity), got {self.alpha}")
        if self.strength < 0:
            raise ConfigError(f"{p}strength: must be >= 0 (0 leaves routing unchanged), got {self.strength}")
        if self.period < 1:
            raise ConfigError(f"{p}period: must be >= 1 step, got {self.period}")


@dataclass
class PlacementConfig:
    enabled: bool = False  # re-place experts across EP ranks from their predicted load
    interval: int = 10  # check (and maybe migrate) every N steps
    ema_decay: float = 0.9  # weight of the past in the per-expert load average
    margin: float = 0.1  # migrate only if predicted max/mean rank load drops by this fraction
    # skewed-routing workload: applies with placement on or off (a mapping, so that its fields' errors
    # name them: the loader reports a bad Optional[mapping] as a whole)
    skew: SkewConfig = field(default_factory=SkewConfig)

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        if self.interval < 1:
            raise ConfigError(f"{p}interval: must be >= 1 step, got {self.interval}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{p}ema_decay: must lie in [0, 1) (0: last step only), got {self.ema_decay}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"{p}margin: must lie in [0, 1) (0: any predicted gain migrates), got {self.margin}")

    def check_recipe(self, parallel: "ParallelConfig", model: "ModelConfig", memory: "MemoryConfig") -> None:
        """Rules that need other sections (the skew's alone when placement is off)."""
        if self.skew.enabled and model.num_moe_layers == 0:
            raise ConfigError("placement.skew.enabled: the model has no MoE layer to skew; set enabled: false")
        if not self.enabled:
            return
        if model.num_moe_layers == 0:
            raise ConfigError("placement.enabled: the model has no MoE layer; set enabled: false")
        if parallel.ep < 2 or parallel.dispatcher == "local":
            raise ConfigError("placement.enabled: experts can only move between EP ranks; set parallel.ep >= 2 "
                              "with dispatcher alltoall, allgather or hierarchical, or enabled: false")
        if memory.optimizer_offload:
            raise ConfigError("placement.enabled: cannot move host-offloaded optimizer state yet; set "
                              "memory.optimizer_offload: false or enabled: false")
