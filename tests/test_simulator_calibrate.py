"""Calibration fits and validation bookkeeping on synthetic data with known answers."""
import pytest

from moe.config import ConfigError
from simulator.calibrate import fit_link, fit_matmul, predict_linear
from simulator.comm import all_gather, all_reduce, all_to_all
from simulator.hardware import MatmulEfficiency, load_hardware
from simulator.opbench import fit_line
from simulator.validate import Case, case_layout, case_profile, dedicated_step_time
from simulator.validate_worker import ep_imbalance


def test_fit_link_recovers_bandwidth_and_latency():
    bw, lat = 2e9, 50e-6
    rows = []
    for world in (2, 4):
        for nbytes in (2**16, 2**20, 2**23):
            for name, c in (("all_reduce", all_reduce(nbytes, world, 1, world)),
                            ("all_gather", all_gather(nbytes, world, 1, world)),
                            ("all_to_all", all_to_all(nbytes, world, 1, world))):
                rows.append((name, world, nbytes, c.steps * lat + c.bytes / bw))
    link, rms = fit_link(rows)
    assert link.bandwidth_gbps == pytest.approx(2.0, rel=1e-6)
    assert link.latency_us == pytest.approx(50.0, rel=1e-6)
    assert rms < 1e-9


def test_fit_matmul_recovers_the_curve():
    truth = MatmulEfficiency(peak_fraction=1.0, half_dim=32.0)
    peak, bw, ovh = 1e11, 1e10, 5e-6
    samples = [(m, k, n, predict_linear(truth, peak, bw, ovh, m, k, n))
               for m in (64, 256, 1024) for k in (64, 256, 1024) for n in (64, 1024)]
    got_peak, eff, rms = fit_matmul(samples, bw, ovh)
    assert got_peak == pytest.approx(peak, rel=0.02)
    assert eff.half_dim == pytest.approx(32.0)
    assert rms < 0.02


def test_fit_line():
    assert fit_line([(0, 1.0), (10, 21.0), (20, 41.0)]) == (pytest.approx(1.0), pytest.approx(2.0))


def test_dedicated_step_time_removes_lost_time_slices():
    ranks = [{"wall_s": 1.0, "cpu_s": 0.5, "run_delay_s": 0.2}, {"wall_s": 0.9, "cpu_s": 0.6, "run_delay_s": 0.1}]
    assert dedicated_step_time(ranks) == pytest.approx(0.7)  # 1.0 - 0.2 - 0.1
    ranks[1]["run_delay_s"] = 0.6  # overlapping preemptions: floored at the busiest rank's CPU time
    assert dedicated_step_time(ranks) == pytest.approx(0.6)


def test_ep_imbalance():
    # 4 experts on 2 ranks: ranks get 3+5=8 and 1+3=4 copies; mean 6 -> 8/6; second layer even
    assert ep_imbalance([[3, 5, 1, 3], [2, 2, 2, 2]], 2) == pytest.approx((8 / 6 + 1.0) / 2)
    assert ep_imbalance([[3, 5, 1, 3]], 1) == 1.0


def test_case_layout_and_profile():
    lay = case_layout(Case(name="x", world=2, ep=2, micro_batch_size=4, grad_accum=3, dispatcher="alltoall"))
    assert (lay.ep, lay.global_batch_size, lay.dispatcher) == (2, 24, "alltoall")
    assert case_layout(Case(name="y", ep=1, dispatcher="alltoall")).dispatcher == "local"
    with pytest.raises(ConfigError, match="concurrency_slowdown"):
        case_profile(load_hardware("ascend_910b_a2"), Case(name="z", world=2))
