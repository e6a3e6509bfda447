"""Bad input, one clear line each: non-finite numbers anywhere in a config, and the simulator's
command line. (The trainer's data, checkpoint and device faults are in their own test files.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import ConfigError, from_dict
from launch.trainer.recipe import load_recipe
from simulator.cli import main as simulate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "tiny_cpu.yaml"
PANGU = str(ROOT / "configs" / "simulator" / "pangu_718b_6k_910b.yaml")


@pytest.mark.parametrize("override, field", [
    ({"train.lr": ".nan"}, "train.lr"),
    ({"train.lr": ".inf"}, "train.lr"),
    ({"train.grad_clip": "-.inf"}, "train.grad_clip"),
    ({"model.norm_eps": ".nan"}, "model.norm_eps"),
    ({"model.aux_loss_coeff": ".inf"}, "model.aux_loss_coeff"),
    ({"resilience.spike_factor": ".nan"}, "resilience.spike_factor"),
])
def test_non_finite_numbers_in_a_recipe_are_rejected(override, field):
    overrides = {k: yaml.safe_load(v) for k, v in override.items()}
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, overrides)
    assert str(e.value).startswith(f"{field}: must be a finite number"), str(e.value)


def test_non_finite_values_inside_mappings_are_rejected():
    from simulator.hardware import HardwareProfile, load_hardware
    from dataclasses import asdict
    data = asdict(load_hardware("cpu_calibrated"))
    data["peak_tflops"]["fp32"] = float("nan")
    with pytest.raises(ConfigError, match=r"^hardware.peak_tflops.fp32: must be a finite number"):
        from_dict(HardwareProfile, data, "hardware")


@pytest.mark.parametrize("args, message", [
    (["--set", "layout.tp=2", "--devices", "0"], "error: num_devices: must be >= 1, got 0"),
    (["--set", "options.expert_imbalance=.nan"], "error: options.expert_imbalance: must be a finite number"),
    (["--set", "layout"], "error: --set 'layout': expected section.field=value"),
    (["--set", "layout.tp=2", "--hardware", "configs/hardware/nope.yaml"], "error: hardware: unknown profile"),
])
def test_simulator_command_line_errors_are_one_line(args, message, capsys):
    assert simulate(["estimate", "--recipe", PANGU, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_nan_link_bandwidth_in_a_profile_file_is_rejected(tmp_path, capsys):
    hw = yaml.safe_load((ROOT / "configs" / "hardware" / "nvidia_h800.yaml").read_text())
    hw["intra_node"]["bandwidth_gbps"] = float("nan")
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(hw))
    assert simulate(["estimate", "--recipe", PANGU, "--hardware", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: hardware.intra_node.bandwidth_gbps: must be a finite number")
