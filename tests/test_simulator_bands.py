"""Error bands from validation residuals (simulator/bands.py): hand-computed intervals, the record
written into a profile, estimates that carry them, and a search ranked by their slow end."""
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from config import from_dict
from moe.config import ModelConfig
from simulator.bands import band_for, layout_features, record_bands, residual_bands, step_time_interval
from simulator.cost import Simulator
from simulator.hardware import load_hardware
from simulator.search import search_layouts
from tests.test_simulator_search import SMALL, small_hw, small_space

ROWS = [  # signed errors (predicted - measured) / measured, in percent
    {"case": "one", "error_pct": 4.0, "features": []},
    {"case": "tp2", "error_pct": 12.0, "features": ["tp"]},
    {"case": "ep2", "error_pct": -8.0, "features": ["ep", "alltoall"]},
    {"case": "ep2-hier", "error_pct": -14.0, "features": ["ep", "hierarchical"]},
    {"case": "broken", "error_pct": None, "features": ["pp"]},  # not measured: no band
]


def test_bands_are_the_extreme_residuals_per_feature():
    b = residual_bands(ROWS)
    assert b == {"all": [-14.0, 12.0], "tp": [12.0, 12.0], "ep": [-14.0, -8.0], "alltoall": [-8.0, -8.0],
                 "hierarchical": [-14.0, -14.0]}
    # a layout's band: the widest ends over "all" and its features; unvalidated features named
    assert band_for({"ep", "alltoall", "cp"}, b) == (-14.0, 12.0, ["cp"])
    assert band_for(set(), {}) is None
    # an error within [-14, +12] % puts the true time in [pred / 1.12, pred / 0.86]
    lo, hi = step_time_interval(1.0, -14.0, 12.0)
    assert lo == pytest.approx(1 / 1.12) and hi == pytest.approx(1 / 0.86)


def test_layout_features():
    assert layout_features() == set()
    assert layout_features(tp=2, ep=2, dp=2, tp_extend_ep=True, dispatcher="hierarchical", zero1=True) == \
        {"tp", "ep", "dp", "tp_extend_ep", "hierarchical", "zero1"}
    assert layout_features(ep=1, dispatcher="alltoall") == set()  # no exchange without EP
    # another rank order counts where it changes the groups: tp > 1 and several data ranks
    assert "rank_order" in layout_features(tp=2, ep=2, dp=2, rank_order="dp-cp-tp")
    assert "rank_order" not in layout_features(tp=2, dp=1, rank_order="dp-cp-tp")
    assert "rank_order" not in layout_features(tp=2, dp=2)


def test_bands_join_the_last_three_validations(tmp_path):
    from simulator.bands import BAND_RUNS
    assert BAND_RUNS == 3
    src = Path(__file__).parents[1] / "configs/hardware/cpu_calibrated.yaml"
    p = tmp_path / "prof.yaml"
    shutil.copy(src, p)
    first = record_bands(p, ROWS)
    assert first == {"all": [-14.0, 12.0], "tp": [12.0, 12.0], "ep": [-14.0, -8.0], "alltoall": [-8.0, -8.0],
                     "hierarchical": [-14.0, -14.0]}
    second = [{"case": "one", "error_pct": 20.0, "features": []}, {"case": "tp2", "error_pct": -3.0, "features": ["tp"]}]
    third = [{"case": "one", "error_pct": 1.0, "features": []}]
    record_bands(p, second)  # this run's own ranges joined with the first run's
    prof = load_hardware(p)
    assert prof.error_bands == {"all": [-14.0, 20.0], "tp": [-3.0, 12.0], "ep": [-14.0, -8.0],
                                "alltoall": [-8.0, -8.0], "hierarchical": [-14.0, -14.0]}
    assert prof.error_band_cases == 4 + 2 and prof.error_band_cases_history == [4, 2]
    assert prof.error_bands_history[-1] == {"all": [-3.0, 20.0], "tp": [-3.0, -3.0]}
    record_bands(p, third)
    assert load_hardware(p).error_bands["all"] == [-14.0, 20.0]  # still three runs
    record_bands(p, third)  # a fourth run drops the first: only the last three count
    prof = load_hardware(p)
    assert prof.error_bands == {"all": [-3.0, 20.0], "tp": [-3.0, -3.0]} and prof.error_band_cases == 2 + 1 + 1
    text = p.read_text()
    assert text.count("error_bands:") == 1 and text.count("error_bands_history:") == 1
    assert text.startswith("# Written by `python -m simulator calibrate`")
    assert replace(prof, error_bands={}, error_band_cases=0, error_bands_history=[],
                   error_band_cases_history=[]) == load_hardware(src)  # nothing else changed


def test_estimates_carry_the_band_and_search_can_rank_by_its_slow_end():
    cfg = from_dict(ModelConfig, SMALL)
    plain = small_hw(memory_gb=1.0)
    # expert parallelism measured twice as slow as predicted (-50 %), everything else exact
    banded = replace(plain, error_bands={"all": [-50.0, 0.0], "ep": [-50.0, -50.0], "tp": [0.0, 0.0]})
    sim = Simulator(cfg, banded, 16)
    space = small_space(pp=[1], vpp=[1], cp=[1])
    best = search_layouts(Simulator(cfg, plain, 16), space, rerank=5).best[0]
    est = sim.estimate(best.layout)
    assert est.error_band_pct == (-50.0, 0.0) and est.step_time_band == pytest.approx((est.step_time, 2 * est.step_time))
    assert Simulator(cfg, plain, 16).estimate(best.layout).step_time_band is None
    # "all" already spans -50 %: every layout gets the same relative band, so the order is unchanged
    same = search_layouts(sim, space, rerank=5, pessimistic=True).best
    assert same[0].layout == best.layout
    # only ep under-predicted: pessimistic ranking prefers layouts without expert parallelism
    ep_only = Simulator(cfg, replace(plain, error_bands={"all": [0.0, 0.0], "ep": [-50.0, -50.0]}), 16)
    optimistic = search_layouts(ep_only, space, rerank=5).best[0]
    pessimistic = search_layouts(ep_only, space, rerank=5, pessimistic=True).best[0]
    assert optimistic.derived.ep > 1 and pessimistic.derived.ep == 1
    assert pessimistic.pessimistic_step_time < optimistic.pessimistic_step_time


def test_validation_report_has_a_table_per_case_and_a_scatter_plot(tmp_path):
    from simulator.report import write_validation_report
    from simulator.validate import summarize
    rows = [dict(case="one", world=1, tp=1, ep=1, dispatcher="local", micro_batch_size=4, seq_len=128,
                 grad_accum=1, features=[], predicted_s=0.11, measured_s=0.10, error_pct=10.0,
                 calibration_only_error_pct=12.0, band_low_s=0.09, band_high_s=0.12, in_band=True, note="",
                 calibration_only_s=0.112, act_error_pct=None),
            dict(case="ep2", world=2, tp=1, ep=2, dispatcher="alltoall", micro_batch_size=4, seq_len=128,
                 grad_accum=2, features=["ep", "alltoall"], predicted_s=0.2, measured_s=0.25, error_pct=-20.0,
                 calibration_only_error_pct=-18.0, band_low_s=0.19, band_high_s=0.22, in_band=False, note="",
                 calibration_only_s=0.205, act_error_pct=None)]
    paths = write_validation_report(rows, summarize(rows), "cpu_calibrated", tmp_path / "rep")
    assert [p.name for p in paths] == ["validation.json", "validation.md", "validation.png"]
    md = paths[1].read_text()
    assert "| ep2 | world 2, ep 2, alltoall, 4x128 tokens x2 | ep, alltoall | 0.2000 | 0.2500 | -20.0% |" in md
    assert "| 0.1900-0.2200 | **no** |" in md and "1 of 2 measured step times inside" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a .json path keeps its name, the other two beside it
    named = write_validation_report(rows, summarize(rows), "cpu_calibrated", tmp_path / "v" / "val.json")
    assert [p.name for p in named] == ["val.json", "val.md", "val.png"]


@pytest.mark.parametrize("extra, message", [
    ("error_bands_history: [{all: [1.0, 2.0]}]\nerror_band_cases_history: []\n",
     "error_band_cases_history: 0 entries for 1 in error_bands_history"),
    ("error_bands_history: [{all: [3.0, 2.0]}]\nerror_band_cases_history: [4]\n",
     r"error_bands_history\[0\].all: expected \[lowest, highest\]"),
    ("error_bands_history: nonsense\n", "error_bands_history: expected a list"),
])
def test_a_bad_band_history_is_one_clear_error(tmp_path, extra, message):
    from config import ConfigError
    p = tmp_path / "prof.yaml"
    p.write_text((Path(__file__).parents[1] / "configs/hardware/cpu_calibrated.yaml").read_text() + extra)
    with pytest.raises(ConfigError, match=message):
        load_hardware(p)
    with pytest.raises(ConfigError, match=message):  # recording onto it names the same field
        record_bands(p, ROWS)
