"""Calibration fits and validation bookkeeping on synthetic data with known answers."""
from dataclasses import replace
from pathlib import Path

import pytest

from moe.config import ConfigError
from simulator.calibrate import fit_link, fit_matmul, predict_linear
from simulator.comm import all_gather, all_reduce, all_to_all
from simulator.hardware import MatmulEfficiency, load_hardware
from simulator.opbench import fit_line
from simulator.validate import Case, aggregate_steps, case_layout, case_profile, dedicated_step_time, scaled_profile
from simulator.validate_worker import ep_imbalance

ROOT = Path(__file__).resolve().parents[1]


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


def test_scaled_profile_scales_compute_side_costs_only():
    hw = replace(load_hardware("cpu_calibrated"), step_correction=1.5)
    s = scaled_profile(hw, 2.0)  # slower machine x2, times the profile's step correction x1.5
    assert s.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 3)
    assert s.memory_bandwidth_gbps == pytest.approx(hw.memory_bandwidth_gbps / 3)
    assert s.op_overhead_us == pytest.approx(hw.op_overhead_us * 3)
    assert s.op_costs["norm"] == pytest.approx([x * 3 for x in hw.op_costs["norm"]])
    assert s.optimizer_cost == pytest.approx([x * 3 for x in hw.optimizer_cost])
    assert (s.intra_node, s.inter_node, s.step_correction) == (hw.intra_node, hw.inter_node, 1.0)
    # calibration alone: one rank at the calibrated speed, two at the calibrated concurrency factor
    assert case_profile(hw, Case(name="a")).peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 1.5)
    two = case_profile(replace(hw, concurrency_slowdown={2: 1.2}), Case(name="b", world=2))
    assert two.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 1.8)
    fast = case_profile(replace(hw, concurrency_slowdown={2: 0.9}), Case(name="c", world=2))
    assert fast.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 1.5)  # below 1: noise, clamped


def test_aggregate_steps_takes_medians_after_warmup():
    def step(wall, delay, probe, imb=1.0):
        return {"wall_s": wall, "cpu_s": 0.0, "run_delay_s": delay, "probe": probe, "ep_imbalance": imb}
    rank0 = [step(9.0, 0.0, 9.0), step(1.0, 0.1, 0.010), step(1.2, 0.0, 0.012), step(5.0, 4.0, 0.011)]
    rank1 = [step(9.0, 0.0, 9.0), step(1.0, 0.0, 0.013), step(1.1, 0.0, 0.010), step(5.0, 0.0, 0.010)]
    got = aggregate_steps([rank0, rank1], warmup=1)
    # busy per step: 1.0 - 0.1 = 0.9, 1.2, 5.0 - 4.0 = 1.0 -> median 1.0, fastest 0.9
    assert (got["step_time_s"], got["fastest_s"]) == (pytest.approx(1.0), pytest.approx(0.9))
    assert got["wall_s"] == pytest.approx(1.2)
    # slowest rank's probe per step: 0.013, 0.012, 0.011 -> median 0.012
    assert got["probe_s"] == pytest.approx(0.012)
    assert got["steps"] == 3


def test_validation_refuses_a_profile_without_probe_baseline(tmp_path):
    from simulator.calibrate import write_profile
    from simulator.validate import run_validation
    old = write_profile(replace(load_hardware("cpu_calibrated"), speed_probe=0.0), tmp_path / "old.yaml")
    with pytest.raises(ConfigError, match="speed_probe.*re-run `python -m simulator calibrate`"):
        run_validation(old)


def test_validate_runs_the_trainer_and_probes_every_rank(tmp_path):
    """Plumbing, not accuracy: one single-process and one 2-rank expert-parallel case of a tiny MoE
    run through the real trainer; every row is measured, with the probe's slowdown and both
    predictions (timings on a shared machine are checked by `bench/`, not here)."""
    import yaml

    from simulator.validate import run_validation, summarize
    model = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "max_seq_len": 64, "num_heads": 2,
             "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
             "dense_ffn_size": 128, "first_k_dense": 1, "num_experts": 4, "top_k": 2, "expert_ffn_size": 64,
             "mtp_layers": 0}
    cases = [{"name": "one", "micro_batch_size": 2, "seq_len": 32},
             {"name": "ep2", "world": 2, "ep": 2, "dispatcher": "alltoall", "micro_batch_size": 2, "seq_len": 32}]
    cfg = tmp_path / "v.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "steps": 3, "warmup_steps": 1, "cases": cases}))
    rows = run_validation(ROOT / "configs/hardware/cpu_calibrated.yaml", cfg, workdir=tmp_path / "w", log=lambda s: None)
    assert [r["case"] for r in rows] == ["one", "ep2"]
    for r in rows:
        assert r["note"] == "" and r["measured_s"] > 0 and r["machine_slowdown"] > 0
        assert r["predicted_s"] > 0 and r["calibration_only_s"] > 0 and r["error_pct"] is not None
    assert rows[1]["ep_imbalance"] >= 1.0
    assert summarize(rows)["measured"] == 2


def test_step_correction_trains_the_held_out_model():
    from simulator.calibrate import measure_step_correction
    ratio, measured, modelled = measure_step_correction(load_hardware("cpu_calibrated"))
    assert measured > 0 and modelled > 0 and ratio == pytest.approx(measured / modelled)
