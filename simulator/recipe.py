"""A simulation recipe: model, hardware, cluster size, layout and modelling options in one YAML file.

    model: ../models/pangu_ultra_moe_718b.yaml   # a path (relative to this file) or a mapping
    hardware: ascend_910b_a2                      # a profile name or a path
    num_devices: 6144
    layout: {tp: 8, pp: 16, vpp: 2, ...}
    options: {expert_imbalance: 1.1, ...}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from config import ConfigError, from_dict, load_yaml
from moe.config import ModelConfig, model_section
from simulator.cost import SimOptions
from simulator.hardware import resolve_hardware
from simulator.layout import Layout


@dataclass
class SimRecipe:
    model: ModelConfig
    hardware: str
    num_devices: int
    layout: Layout = field(default_factory=Layout)
    options: SimOptions = field(default_factory=SimOptions)

    def validate(self, path: str = "") -> None:
        if self.num_devices < 1:
            raise ConfigError(f"num_devices: must be >= 1, got {self.num_devices}")


def sim_recipe_from_dict(data: dict, base: Path, origin: str = "the recipe") -> SimRecipe:
    """A SimRecipe from its raw mapping, its `model` and `hardware` files looked up relative to
    `base` (the recipe's folder) first."""
    for need in ("model", "hardware", "num_devices"):
        if need not in data:
            raise ConfigError(f"{need}: missing from {origin}; set it in the recipe or on the command line")
    data = dict(data, model=model_section(data["model"], base), hardware=resolve_hardware(data["hardware"], base))
    return from_dict(SimRecipe, data)


def load_sim_recipe(path: str | Path) -> SimRecipe:
    p = Path(path)
    return sim_recipe_from_dict(load_yaml(p), p.parent, str(p))
