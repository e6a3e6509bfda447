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

from moe.config import ConfigError, ModelConfig, from_dict, load_yaml
from simulator.cost import SimOptions
from simulator.layout import Layout

SIM_RECIPES = Path(__file__).resolve().parents[1] / "configs" / "simulator"


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


def resolve_model(value, base: Path) -> dict:
    """A model given as a mapping, or as a path relative to `base` (or the working directory)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        for cand in (base / value, Path(value)):
            if cand.is_file():
                return load_yaml(cand)
        raise ConfigError(f"model: file {value!r} not found (relative to {base} or the working directory)")
    raise ConfigError(f"model: expected a path or a mapping of model fields, got {value!r}")


def load_sim_recipe(path: str | Path) -> SimRecipe:
    p = Path(path)
    data = load_yaml(p)
    if "model" not in data:
        raise ConfigError(f"{p}: model: required (a model YAML path or a mapping)")
    data["model"] = resolve_model(data["model"], p.parent)
    hw = data.get("hardware")
    if isinstance(hw, str) and hw.endswith(".yaml") and not Path(hw).is_file() and (p.parent / hw).is_file():
        data["hardware"] = str(p.parent / hw)
    return from_dict(SimRecipe, data)
