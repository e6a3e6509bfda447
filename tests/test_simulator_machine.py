"""A CPU profile knows the machine it was measured on; estimate/validate warn when this one differs."""
from dataclasses import replace

from simulator.calibrate import write_profile
from simulator.hardware import load_hardware
from simulator.machine import FIX, profile_mismatch, this_machine

HERE = {"cpu_model": "AMD EPYC 7B13", "cpus": 2, "torch": "2.13.0", "threads": 1}


def _profile(**kw):
    return replace(load_hardware("cpu_calibrated"), speed_probe=0.01, **kw)


def test_same_machine_at_the_same_speed_is_silent():
    assert profile_mismatch(_profile(measured_on=dict(HERE)), probe_s=0.011, here=HERE) is None


def test_another_cpu_or_torch_is_named_with_the_fix():
    prof = _profile(measured_on={**HERE, "cpu_model": "Intel Xeon 8480", "torch": "2.6.0"})
    msg = profile_mismatch(prof, probe_s=0.01, here=HERE)
    assert msg.startswith("warning: hardware profile 'cpu_calibrated'") and msg.endswith(FIX)
    assert "cpu_model 'Intel Xeon 8480' there, 'AMD EPYC 7B13' here" in msg and "torch '2.6.0' there" in msg
    assert "\n" not in msg


def test_a_slower_machine_and_an_unrecorded_profile_warn():
    msg = profile_mismatch(_profile(measured_on=dict(HERE)), probe_s=0.02, here=HERE)
    assert "speed probe runs 2.00x its calibration time" in msg
    assert "does not record the machine" in profile_mismatch(_profile(measured_on={}), probe_s=0.01)


def test_quoted_accelerator_profiles_are_not_checked():
    assert profile_mismatch(load_hardware("ascend_910b_a2"), probe_s=1.0) is None


def test_the_record_survives_writing_and_loading_a_profile(tmp_path):
    rec = this_machine(1)
    assert set(rec) == {"cpu_model", "cpus", "torch", "threads"} and rec["cpus"] >= 1
    path = write_profile(_profile(measured_on=rec), tmp_path / "p.yaml")
    assert load_hardware(path).measured_on == rec
