"""The `placement:` recipe section (parallel/placement_config.py): each bad field is one ConfigError
that names it and the fix, raised while loading the recipe (before any process group)."""
from __future__ import annotations

import pytest

from config import ConfigError
from launch.trainer.recipe import load_recipe
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "configs/recipes/tiny_cpu.yaml"
EP2 = {"parallel.ep": 2, "parallel.dispatcher": "alltoall", "placement.enabled": True}


@pytest.mark.parametrize("overrides, message", [
    ({"placement.interval": 0}, "placement.interval: must be >= 1 step, got 0"),
    ({"placement.ema_decay": 1.0}, "placement.ema_decay: must lie in [0, 1)"),
    ({"placement.margin": -0.1}, "placement.margin: must lie in [0, 1)"),
    ({"placement.skew": {"enabled": True, "period": 0}}, "placement.skew.period: must be >= 1 step, got 0"),
    ({"placement.skew.enabled": True, "placement.skew.period": 0}, "placement.skew.period: must be >= 1 step, got 0"),
    ({"placement.skew.enabled": True, "model.num_layers": 1, "model.first_k_dense": 1},
     "placement.skew.enabled: the model has no MoE layer to skew; set enabled: false"),
    ({"placement.interval.every": 3}, "placement.interval: expected an integer, got {'every': 3}"),
    ({"train.steps.x": 1}, "override 'train.steps.x': train.steps is not a mapping"),
    ({"placement.skew": {"enabled": True, "alpha": -1.0}}, "placement.skew.alpha: must be >= 0"),
    ({"placement.skew": {"zipf": 1.0}}, "placement.skew.zipf: unknown field for SkewConfig"),
    ({"placement.intervall": 3}, "placement.intervall: unknown field for PlacementConfig; did you mean 'interval'?"),
    ({"placement.enabled": True}, "placement.enabled: experts can only move between EP ranks; set parallel.ep >= 2"),
    ({**EP2, "memory.optimizer_offload": True}, "placement.enabled: cannot move host-offloaded optimizer state yet"),
])
def test_bad_placement_fields(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(RECIPE, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_good_placement_section_loads():
    r = load_recipe(RECIPE, {**EP2, "placement.interval": 3, "placement.skew": {"enabled": True, "alpha": 1.5}})
    assert r.placement.enabled and r.placement.interval == 3 and r.placement.skew.alpha == 1.5
    assert r.placement.skew.enabled and r.placement.skew.period == 10  # defaults fill the rest
    assert not load_recipe(RECIPE).placement.skew.enabled
    # with tensor parallelism too (tests/test_placement_dist.py, tests/test_placement_checkpoint.py)
    assert load_recipe(RECIPE, {**EP2, "parallel.tp": 2, "parallel.tp_extend_ep": True}).placement.enabled
    assert load_recipe(RECIPE, {**EP2, "parallel.pp": 2, "train.grad_accum": 2}).placement.enabled
