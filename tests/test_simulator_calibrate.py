"""Calibration fits and validation bookkeeping on synthetic data with known answers."""
from dataclasses import replace
from pathlib import Path

import pytest

from config import ConfigError
from parallel.config import ParallelConfig
from simulator.calibrate import fit_matmul, predict_linear
from simulator.calibrate_comm import fit_link
from simulator.comm import all_gather, all_reduce, all_to_all
from simulator.hardware import MatmulEfficiency, load_hardware
from simulator.opbench import fit_line
from simulator.validate import Case, aggregate_steps, case_layout, case_profile, dedicated_step_time, scaled_profile
from launch.validate_worker import ep_imbalance

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


def test_fit_two():
    from simulator.opbench import fit_two
    # y = 1.5 x1 + 0.25 x2, no intercept
    assert fit_two([(1, 2, 2.0), (2, 1, 3.25), (3, 8, 6.5)]) == (pytest.approx(1.5), pytest.approx(0.25))
    assert fit_two([(1, 2, 3.0), (2, 4, 6.0)]) is None  # proportional columns: nothing to separate


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
    case = Case(name="x", world=2, micro_batch_size=4, grad_accum=3, parallel=ParallelConfig(ep=2, dispatcher="alltoall"))
    lay = case_layout(case)
    assert (lay.ep, lay.global_batch_size, lay.dispatcher, lay.devices_per_node) == (2, 24, "alltoall", 2)
    assert not lay.sequence_parallel and not lay.zero1  # the runtime's defaults, not the simulator's
    assert lay.parallel(8) == case.parallel_section()  # the trainer's section, field for field
    with pytest.raises(ConfigError, match="concurrency_slowdown"):
        case_profile(load_hardware("ascend_910b_a2"), Case(name="z", world=2))


def test_scaled_profile_scales_compute_side_costs_only():
    hw = replace(load_hardware("cpu_calibrated"), work_correction=1.5, overhead_correction=2.5)
    s = scaled_profile(hw, 2.0)  # a machine running x2 slower
    assert s.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 2)
    assert s.memory_bandwidth_gbps == pytest.approx(hw.memory_bandwidth_gbps / 2)
    assert s.op_overhead_us == pytest.approx(hw.op_overhead_us * 2)
    assert s.op_costs["norm"] == pytest.approx([x * 2 for x in hw.op_costs["norm"]])
    assert s.optimizer_cost == pytest.approx([x * 2 for x in hw.optimizer_cost])
    # links and the corrections (which the simulator applies) stay as calibrated
    assert (s.intra_node, s.inter_node, s.collective_links) == (hw.intra_node, hw.inter_node, hw.collective_links)
    assert (s.work_correction, s.overhead_correction) == (1.5, 2.5)
    # calibration alone: one rank at the calibrated speed, two at the calibrated concurrency factor
    assert case_profile(hw, Case(name="a")).peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"])
    two = case_profile(replace(hw, concurrency_slowdown={2: 1.2}), Case(name="b", world=2))
    assert two.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 1.2)
    fast = case_profile(replace(hw, concurrency_slowdown={2: 0.9}), Case(name="c", world=2))
    assert fast.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"])  # below 1: noise, clamped


def test_corrected_folds_work_and_overhead_factors():
    hw = replace(load_hardware("cpu_calibrated"), work_correction=2.0, overhead_correction=3.0)
    c = hw.corrected()
    assert c.peak_tflops["fp32"] == pytest.approx(hw.peak_tflops["fp32"] / 2)
    assert c.memory_bandwidth_gbps == pytest.approx(hw.memory_bandwidth_gbps / 2)
    assert c.op_overhead_us == pytest.approx(hw.op_overhead_us * 3)
    a, b = hw.op_costs["rope"]
    assert c.op_costs["rope"] == pytest.approx([a * 3, b * 2])  # [fixed us, ns per element]
    assert c.optimizer_cost == hw.optimizer_cost  # a measured step of its own
    assert (c.work_correction, c.overhead_correction) == (1.0, 1.0)
    zeroed = hw.scaled(1.0, 0.0)  # fixed costs zeroed, as the calibration's work-only model uses
    assert zeroed.op_overhead_us == 0.0 and zeroed.op_costs["rope"] == pytest.approx([0.0, b])
    assert zeroed.peak_tflops == hw.peak_tflops and zeroed.optimizer_cost == hw.optimizer_cost


def test_simulator_applies_the_corrections_to_forward_and_backward_only():
    from simulator.cost import Simulator
    from simulator.validate import load_validate_config, sim_options
    cfg = load_validate_config()
    base = replace(load_hardware("cpu_calibrated"), work_correction=1.0, overhead_correction=1.0, op_overhead_us=0.0,
                   op_costs={k: [0.0, b] for k, (_, b) in load_hardware("cpu_calibrated").op_costs.items()})
    lay = case_layout(Case(name="x"))
    one = Simulator(cfg.model, base, 1, sim_options()).estimate(lay)
    two = Simulator(cfg.model, replace(base, work_correction=2.0), 1, sim_options()).estimate(lay)
    assert two.breakdown["compute"] == pytest.approx(2 * one.breakdown["compute"], rel=1e-9)
    assert two.breakdown["optimizer"] == pytest.approx(one.breakdown["optimizer"], rel=1e-12)
    assert two.mfu == pytest.approx(one.mfu * one.step_time / two.step_time)  # same peak, longer step


def test_fit_corrections_recovers_known_factors():
    from simulator.calibrate_steps import fit_corrections
    from simulator.hardware import CalibrationError
    pts = [(1.3 * w + 2.5 * f, w, f) for w, f in ((0.010, 0.004), (0.090, 0.004), (0.040, 0.006))]
    assert fit_corrections(pts) == (pytest.approx(1.3), pytest.approx(2.5))
    with pytest.raises(CalibrationError, match="do not separate"):
        fit_corrections([(0.03, 0.01, 0.002), (0.06, 0.02, 0.004)])  # same W/F ratio
    with pytest.raises(CalibrationError, match="too noisy"):
        fit_corrections([(0.005, 0.010, 0.004), (0.100, 0.090, 0.004)])  # overhead would be negative


def test_profile_from_an_older_calibration_is_refused(tmp_path):
    from simulator.hardware import load_hardware as load
    text = (ROOT / "configs/hardware/cpu_calibrated.yaml").read_text()
    old = tmp_path / "old.yaml"
    old.write_text(text.replace("work_correction:", "step_correction: 1.2\nwork_correction:"))
    with pytest.raises(ConfigError, match="step_correction.*re-run `python -m simulator calibrate`"):
        load(old)


def test_measured_collective_links_replace_the_profile_links():
    hw = replace(load_hardware("ascend_910b_a2"), collective_links={"all_reduce": [2.0, 50.0], "all_to_all": [1.0, 10.0]})
    # all-reduce of 8 MB over 2 ranks: 2 * (1/2) * 8e6 bytes at 2 GB/s + 2 steps of 50 us
    assert all_reduce(8e6, 2, 1, 8).time(hw) == pytest.approx(8e6 / 2e9 + 2 * 50e-6)
    # all-to-all of 1 MB over 2 ranks sends half: 0.5e6 / 1e9 + 1 step of 10 us
    assert all_to_all(1e6, 2, 1, 8).time(hw) == pytest.approx(0.5e6 / 1e9 + 10e-6)
    from simulator.comm import ep_dispatch
    counts = ep_dispatch("alltoall", 64, 2, 512, 2, 1, 8)[0]  # the count exchange: all-to-all latency
    assert counts.kind == "counts" and counts.time(hw) == pytest.approx(10e-6)
    # kinds the profile did not measure use its links
    plain = load_hardware("ascend_910b_a2")
    assert all_gather(8e6, 2, 1, 8).time(hw) == pytest.approx(all_gather(8e6, 2, 1, 8).time(plain))
    with pytest.raises(ConfigError, match="collective_links.broadcast: unknown collective"):
        replace(plain, collective_links={"broadcast": [1.0, 1.0]}).validate("hardware")
    with pytest.raises(ConfigError, match="collective_links.all_reduce: expected"):
        replace(plain, collective_links={"all_reduce": [0.0, 1.0]}).validate("hardware")


def test_grad_bucket_copy_charges_three_read_write_passes():
    from simulator.cost import Simulator
    from simulator.validate import load_validate_config, sim_options
    cfg = load_validate_config()
    hw = load_hardware("cpu_calibrated")
    lay = case_layout(Case(name="dp2", world=2))
    plain = Simulator(cfg.model, hw, 2, sim_options(world=1)).estimate(lay)
    bucket = Simulator(cfg.model, hw, 2, sim_options(world=2)).estimate(lay)
    params = bucket.memory["grads"] / 4  # fp32 gradients of this rank
    extra = 6 * params * 4 / (hw.memory_bandwidth_gbps * 1e9)
    assert bucket.breakdown["dp_comm"] - plain.breakdown["dp_comm"] == pytest.approx(extra, rel=1e-6)


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
             {"name": "ep2", "world": 2, "parallel": {"ep": 2, "dispatcher": "alltoall"}, "micro_batch_size": 2,
              "seq_len": 32}]
    cfg = tmp_path / "v.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "steps": 3, "warmup_steps": 1, "cases": cases}))
    rows = run_validation(ROOT / "configs/hardware/cpu_calibrated.yaml", cfg, workdir=tmp_path / "w", log=lambda s: None)
    assert [r["case"] for r in rows] == ["one", "ep2"]
    for r in rows:
        assert r["note"] == "" and r["measured_s"] > 0 and r["machine_slowdown"] > 0
        assert r["predicted_s"] > 0 and r["calibration_only_s"] > 0 and r["error_pct"] is not None
    assert rows[1]["ep_imbalance"] >= 1.0
    assert summarize(rows)["measured"] == 2


def test_corrections_train_the_held_out_model_at_three_sizes(monkeypatch):
    """Plumbing, not accuracy: both sizes of the held-out model run through the real trainer and
    reach the fit as (measured forward + backward, modelled work, modelled fixed cost)."""
    import simulator.calibrate_steps as cal
    import simulator.validate as val
    seen = []
    monkeypatch.setattr(cal, "fit_corrections", lambda pts: seen.extend(pts) or (1.0, 1.0))
    prof = load_hardware("cpu_calibrated")
    real_measure = val.measure

    def measure_at_profile_speed(*args, **kwargs):
        # the modelled costs scale with the speed probe read during each run; pin it to the
        # profile's own reading so a noisy neighbour cannot move the modelled fixed cost
        out = real_measure(*args, **kwargs)
        assert out.get("probe_s", 0) > 0, out
        return {**out, "probe_s": prof.speed_probe}
    monkeypatch.setattr(val, "measure", measure_at_profile_speed)
    assert cal.measure_corrections(prof, log=lambda s: None) == (1.0, 1.0)
    assert len(seen) == len(cal.CALIBRATION_STEPS) == 3
    (m1, w1, f1), _, (m3, w3, f3) = seen
    assert m1 > 0 and m3 > m1  # the larger step takes longer
    assert w3 > 4 * w1 and f1 > 0 and f3 == pytest.approx(f1, rel=0.2)  # work grows with tokens, fixed costs do not


def test_a_failed_calibration_is_one_line_and_keeps_the_old_profile(tmp_path, monkeypatch, capsys):
    import simulator.calibrate as cal
    from simulator.cli import main
    from simulator.hardware import CalibrationError
    out = tmp_path / "cpu.yaml"
    out.write_text("previous profile\n")

    def fail(*a, **k):
        raise CalibrationError("calibration steps: fitted work x-0.10, overhead x2.00 (must be > 0)")
    monkeypatch.setattr(cal, "measure_bandwidth", fail)
    assert main(["calibrate", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: calibration steps: fitted work x-0.10, overhead x2.00 (must be > 0); the profile was not written"]
    assert out.read_text() == "previous profile\n"


def test_step_share_is_the_mean_less_the_slowest_tail():
    from simulator.calibrate_comm import step_share
    assert step_share([1.0, 1.0, 4.0]) == pytest.approx(2.0)  # the mean, not the median (1.0)
    assert step_share([1.0] * 39 + [100.0]) == pytest.approx(1.0)  # the slowest 2.5 % dropped
    assert step_share([3.0]) == 3.0
