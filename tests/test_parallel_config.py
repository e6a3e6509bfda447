"""Parallel layouts: the rank groups a layout implies, and bad layouts rejected with one clear
message each before any process group is created."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from launch.trainer.recipe import Recipe
from config import ConfigError, from_dict
from moe.config import ModelConfig
from parallel.config import ParallelConfig
from parallel.layout import Layout
from parallel.runtime import validate_layout


def test_groups_of_ep4_edp2_on_two_nodes_of_four():
    layout = Layout.build(ParallelConfig(ep=4, devices_per_node=2), 8, ModelConfig())
    assert (layout.dp, layout.ep, layout.edp) == (8, 4, 2)
    assert layout.dp_groups() == [list(range(8))]
    assert layout.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.edp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # ep=4 over nodes of 2: each EP group spans 2 nodes; inter-node peers share the local rank.
    assert layout.ep_intra_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.ep_inter_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.node_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_ep_inside_one_node_and_tp_extend_ep_arithmetic():
    inside = Layout.build(ParallelConfig(ep=2, devices_per_node=4), 8, ModelConfig())
    assert (inside.ep_inter, inside.ep_intra) == (1, 2)
    assert inside.ep_inter_groups() == [[r] for r in range(8)]
    # TP-extend-EP: the 2 TP ranks of each MoE layer split experts too, so experts go over ep*tp = 4.
    ext = Layout.build(ParallelConfig(tp=2, ep=2, tp_extend_ep=True), 8, ModelConfig())
    assert (ext.dp, ext.ep, ext.etp, ext.edp) == (4, 4, 1, 2)
    assert ext.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ext.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]  # tp is innermost on the dense side


@pytest.mark.parametrize("par, world, model, message", [
    (dict(ep=3), 6, {}, "parallel.ep: model.num_experts=8 is not divisible by ep=3; choose ep among 1, 2, 4, 8"),
    (dict(ep=4), 6, {}, "parallel.ep: ep = 4 does not divide the 6 ranks of a pipeline stage (world size 6 / pp 1); "
                        "choose ep among 1, 2, 3, 6"),
    (dict(tp=4), 6, {}, "parallel.tp: world size 6 is not a multiple of tp*cp*pp = 4*1*1 = 4"),
    (dict(ep=2, devices_per_node=3), 8, {}, "parallel.devices_per_node: 3 does not divide the world size 8; "
                                            "set it to the number of ranks on each node"),
    (dict(ep=4, dispatcher="local"), 4, {}, "parallel.dispatcher: 'local' keeps every expert on every rank, but ep=4"),
    (dict(ep=4, dispatcher="hierarchical", devices_per_node=6), 12, {},
     "parallel.devices_per_node: the hierarchical dispatcher needs each EP group to fill whole nodes or fit inside "
     "one; ep=4 and devices_per_node=6 do not divide one another"),
    (dict(ep=2, cp=2), 4, {}, "parallel.cp: cp=2 is not supported by the training runtime yet"),
    (dict(ep=2, dispatcher="ring"), 2, {}, "parallel.dispatcher: unknown dispatcher 'ring'; allowed: 'local', "
                                           "'allgather', 'alltoall', 'hierarchical'"),
    (dict(ep=4), 1, {}, "parallel.ep: ep = 4 does not divide the 1 ranks of a pipeline stage"),
])
def test_bad_layout_is_one_clear_error(par, world, model, message):
    with pytest.raises(ConfigError) as e:
        validate_layout(ParallelConfig(**par), ModelConfig(**model), world)
    assert str(e.value).startswith(message), str(e.value)


def test_unknown_dispatcher_in_yaml():
    with pytest.raises(ConfigError) as e:
        from_dict(ParallelConfig, {"dispatcher": "ring"}, "parallel")
    assert str(e.value) == ("parallel.dispatcher: got 'ring'; allowed: one of 'local', 'allgather', 'alltoall', "
                            "'hierarchical', 'auto'")


def test_bad_layout_fails_before_any_process_group(monkeypatch):
    from launch.trainer import distributed

    def forbidden(*args, **kwargs):
        raise AssertionError("init_process_group must not be reached with a bad layout")
    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    recipe = Recipe(model=ModelConfig(num_experts=6), parallel=ParallelConfig(ep=4))
    with pytest.raises(ConfigError, match="parallel.ep: ep = 4 does not divide|model.num_experts=6 is not divisible"):
        distributed.init_distributed(recipe)
    assert not dist.is_initialized()
