"""The training simulator: hardware profiles, a cost model of one training step (compute,
communication, pipeline schedule, memory), layout and model-shape search, calibration on the current
machine and validation against real training runs. See simulator/README.md.

    from simulator import Simulator, Layout, SimOptions, load_hardware
    sim = Simulator(model_cfg, load_hardware("ascend_910b_a2"), num_devices=6144)
    est = sim.estimate(Layout(tp=8, pp=16, vpp=2, ep=4, tp_extend_ep=True, global_batch_size=3072))
"""
from simulator.cost import SimOptions, Simulator
from simulator.estimate import Estimate
from simulator.hardware import HardwareProfile, load_hardware
from simulator.layout import Layout

__all__ = ["Estimate", "HardwareProfile", "Layout", "SimOptions", "Simulator", "load_hardware"]
