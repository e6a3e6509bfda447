"""The simulator's expert imbalance from a measured load trace (simulator/load_trace.py, issue 15):
the trace's reduction (mean over layers, median over steps) by hand, the estimate with and without
placement against estimates at those imbalances, the migration charge, bad traces as one error,
and a trace written by the trainer read end to end through `simulate estimate --load-trace`."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from config import ConfigError
from simulator.cost import Simulator
from simulator.hardware import load_hardware
from simulator.load_trace import compare_placement, read_load_trace
from simulator.recipe import load_sim_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/simulator/deepseek_v3_2k_h800.yaml"


def _write(tmp: Path, records: list[dict]) -> Path:
    path = tmp / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_trace_reduces_to_median_of_layer_means(tmp_path):
    path = _write(tmp_path, [
        {"step": 1, "loss": 5.0},  # a record without placement metrics is skipped
        {"step": 2, "placement_imbalance_before": [1.6, 1.8], "placement_imbalance_after": [1.6, 1.8],
         "placement_bytes": 0, "placement_migrations": 0},
        {"step": 3, "placement_imbalance_before": [1.4, 2.0], "placement_imbalance_after": [1.1, 1.3],
         "placement_bytes": 3 * 2**20, "placement_migrations": 2},
        {"step": 4, "placement_imbalance_before": [2.0, 2.2], "placement_imbalance_after": [1.2, 1.2],
         "placement_bytes": 0, "placement_migrations": 0},
    ])
    t = read_load_trace(path)
    assert t.steps == 3 and t.migrations == 2
    assert t.before == pytest.approx(1.7)  # layer means 1.7, 1.7, 2.1
    assert t.after == pytest.approx(1.2)  # layer means 1.7, 1.2, 1.2
    assert t.migration_bytes_per_step == pytest.approx(2**20)


def test_placement_verdict_uses_the_two_imbalances_and_charges_migrations(tmp_path):
    rec = load_sim_recipe(RECIPE)
    sim = Simulator(rec.model, load_hardware(rec.hardware), rec.num_devices, rec.options)
    path = _write(tmp_path, [{"placement_imbalance_before": [1.5], "placement_imbalance_after": [1.1],
                              "placement_bytes": 2 * 10**9, "placement_migrations": 1}])
    v = compare_placement(sim, rec.layout, read_load_trace(path))

    def at(imbalance):
        return Simulator(rec.model, sim.hw, rec.num_devices, replace(rec.options, expert_imbalance=imbalance)) \
            .estimate(rec.layout).step_time
    assert v.step_without_s == pytest.approx(at(1.5))
    assert v.migration_s == pytest.approx(2 * 10**9 / (sim.hw.inter_node.bandwidth_gbps * 1e9))
    assert v.step_with_s == pytest.approx(at(1.1) + v.migration_s)
    assert at(1.1) < at(1.5)  # the busiest rank sets the pace
    assert "placement pays" in v.describe() or "does not pay" in v.describe()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json\n", "line 1 is not JSON"),
    ('{"step": 1, "loss": 3.0}\n', "no placement_imbalance_before/after records; record the trace with placement.enabled"),
])
def test_bad_trace_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_load_trace(path)


def test_cli_estimates_with_a_trace_and_rejects_a_missing_one(tmp_path):
    """`simulate estimate --load-trace` on records in the trainer's format (a trainer-written trace is
    read in tests/test_placement_train.py)."""
    records = [{"step": s, "placement_imbalance_before": [1.3 + 0.1 * s, 1.5], "placement_imbalance_after":
                [1.1, 1.2], "placement_bytes": 1000, "placement_migrations": int(s == 2)} for s in range(1, 5)]
    path = _write(tmp_path, records)
    out = subprocess.run([sys.executable, "-m", "simulator", "estimate", "--recipe", str(RECIPE), "--load-trace",
                          str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "load trace: 4 steps" in out.stdout and "step without placement" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "simulator", "estimate", "--recipe", str(RECIPE), "--load-trace",
                          str(tmp_path / "missing.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--load-trace:" in bad.stderr and "Traceback" not in bad.stderr
