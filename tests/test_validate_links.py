"""Emulated-link validation cases (configs/simulator/validate_links_cpu.yaml): the simulator
predicts them with the emulated links in place of the profile's (HardwareProfile.with_emulated_links).

- The profile's two link classes become the emulated ones and its measured per-collective links go
  (the emulation charges every collective on the two classes).
- Every shipped case loads with its links as an object (not a mapping) in the layout.
- The dp2 case's prediction grows by at least the hand-computed time of all-reducing every
  gradient over the slow link, and the ep2 all-to-all case predicts the overlapped step no slower
  than the one without overlap.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from parallel.config import EmulateLinks, LinkSpec
from simulator.hardware import load_hardware
from simulator.validate import case_layout, load_validate_config, predict

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/simulator/validate_links_cpu.yaml"


def test_profile_takes_the_emulated_links():
    hw = load_hardware("cpu_calibrated")
    assert hw.collective_links, "the calibrated profile measures its collectives"
    links = EmulateLinks(intra_node=LinkSpec(10.0, 0.05), inter_node=LinkSpec(50.0, 0.02))
    em = hw.with_emulated_links(links)
    assert (em.intra_node.bandwidth_gbps, em.intra_node.latency_us) == (0.05, 10.0)
    assert (em.inter_node.bandwidth_gbps, em.inter_node.latency_us) == (0.02, 50.0)
    assert em.collective_links == {} and em.peak_tflops == hw.peak_tflops
    assert hw.with_emulated_links(None) is hw


def test_cases_load_with_links_and_predict_the_link_time():
    cfg = load_validate_config(CONFIG)
    hw = load_hardware("cpu_calibrated")
    assert len(cfg.cases) >= 4
    for c in cfg.cases:
        assert isinstance(c.parallel.emulate_links, EmulateLinks), c.name
        assert isinstance(case_layout(c).emulate_links, EmulateLinks), c.name
    dp2 = next(c for c in cfg.cases if c.name == "links-dp2")
    from moe_kernels import get_kernels
    from moe.model import MoETransformer
    params = sum(p.numel() for p in MoETransformer(cfg.model, get_kernels("reference")).parameters())
    inter = dp2.parallel.emulate_links.inter_node  # each rank its own node: the slow link
    # ring all-reduce of fp32 gradients over 2 ranks: 2 * 1/2 of the bytes, 2 latency steps
    hand = params * 4 / (inter.bandwidth_gbps * 1e9) + 2 * inter.latency_us * 1e-6
    with_links = predict(cfg.model, hw, dp2)["step_time_s"]
    without = predict(cfg.model, hw, replace(dp2, parallel=replace(dp2.parallel, emulate_links=None)))["step_time_s"]
    assert with_links - without >= 0.9 * hand, (with_links, without, hand)
    assert with_links - without <= 1.5 * hand + 0.05, (with_links, without, hand)
    by_name = {c.name: predict(cfg.model, hw, c)["step_time_s"] for c in cfg.cases}
    assert by_name["links-ep2-a2a-overlap"] <= by_name["links-ep2-a2a-no-overlap"]


def test_fb_overlap_case_pairs_micro_batches():
    """parallel.fb_overlap at pp = 1 (the runtime's pairing, parallel/fb_overlap.py): the three
    steady pairs hide exchanges behind the partner's compute, the first forward and the last
    backward have no partner, the closed form (the search's) agrees with the timeline, and two
    micro-batches' activations are alive at once."""
    from simulator.cost import Simulator
    from simulator.schedule import rank_ops
    from simulator.validate import case_profile, sim_options
    cfg = load_validate_config(CONFIG)
    hw = load_hardware("cpu_calibrated")
    cases = {c.name: c for c in cfg.cases}
    plain, fb = cases["links-ep2-a2a-ga4"], cases["links-ep2-a2a-ga4-fb"]
    assert fb.parallel.fb_overlap and not plain.parallel.fb_overlap and fb.grad_accum == 4
    est = {}
    for c in (plain, fb):
        sim = Simulator(cfg.model, case_profile(hw, c).with_emulated_links(c.parallel.emulate_links), c.world,
                        sim_options(1.0, c.world))
        lay = case_layout(c)
        full, quick = sim.estimate(lay), sim.quick(lay)
        assert abs(full.step_time - quick.step_time) <= 1e-9 * full.step_time, c.name
        est[c.name] = full
    a, b = est[plain.name], est[fb.name]
    assert b.step_time < a.step_time
    assert abs(b.memory["activations"] - 2 * a.memory["activations"]) <= 1e-6 * a.memory["activations"]
    # the timeline: F0 warm-up, B3 cool-down, the rest steady
    assert [op[3] for op in rank_ops(1, 1, 4, 0)] == ["warmup"] + ["steady"] * 6 + ["cooldown"]
