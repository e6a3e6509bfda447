"""Search, the shipped estimates and the CLI: the search returns only valid layouts that fit, its
memory pruning loses none, the large-model estimates are fast, and bad input gives one clear error."""
import json
import time
from pathlib import Path

import pytest

from config import ConfigError, from_dict, load_yaml
from moe.config import ModelConfig, load_model_config
from simulator.cli import main
from simulator.cost import SimOptions, Simulator
from simulator.hardware import HardwareProfile, Link, MatmulEfficiency, load_hardware
from simulator.layout import Layout, derive
from simulator.recipe import load_sim_recipe
from simulator.search import LayoutSpace, ModelSpace, search_layouts, search_models

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=1024, hidden_size=256, num_layers=6, first_k_dense=1, num_heads=8, q_lora_rank=64,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_ffn_size=1024,
             num_experts=16, top_k=2, expert_ffn_size=256, num_shared_experts=1, max_seq_len=1024, mtp_layers=1)


def small_hw(memory_gb: float) -> HardwareProfile:
    return HardwareProfile(name="small", device="npu", peak_tflops={"bf16": 100.0}, memory_gb=memory_gb,
                           memory_bandwidth_gbps=1000.0, devices_per_node=4, intra_node=Link(100.0, 5.0),
                           inter_node=Link(10.0, 10.0), host_link=Link(20.0, 5.0),
                           matmul=MatmulEfficiency(0.7, 64.0), reserved_memory_gb=0.05)


def small_space(**over) -> LayoutSpace:
    base = dict(tp=[1, 2, 4], pp=[1, 2, 3], vpp=[1, 2], ep=[1, 2, 4, 8], cp=[1, 2], micro_batch_size=[1, 2],
                global_batch_size=32, seq_len=512)
    return LayoutSpace(**{**base, **over})


def test_search_returns_only_valid_fitting_layouts():
    cfg = from_dict(ModelConfig, SMALL)
    hw = small_hw(memory_gb=0.25)  # tight: many layouts do not fit
    sim = Simulator(cfg, hw, 16)
    res = search_layouts(sim, small_space(), rerank=5)
    assert res.evaluated > 500 and 0 < res.feasible < res.evaluated
    fitting = [r for r in res.rows if r["fits"]]
    assert len(fitting) == res.feasible
    for row in fitting:
        lay = Layout(tp=row["tp"], pp=row["pp"], vpp=row["vpp"], ep=row["ep"], tp_extend_ep=row["tp_extend_ep"],
                     cp=row["cp"], zero1=row["zero1"], micro_batch_size=row["micro_batch_size"],
                     global_batch_size=32, seq_len=512, recompute=row["recompute"], swap=row["swap"],
                     optimizer_offload=row["optimizer_offload"], dispatcher=row["dispatcher"])
        derive(cfg, lay, 16, hw.devices_per_node)  # divisibility rules hold (raises otherwise)
        assert row["peak_memory_gb"] * 2**30 <= hw.usable_memory_bytes
    assert res.best and all(b.fits and b.peak_memory <= hw.usable_memory_bytes for b in res.best)
    # ranked by the timeline: best first
    assert [b.step_time for b in res.best] == sorted(b.step_time for b in res.best)
    # the closed form the search ranks by stays close to the timeline on these layouts
    for b in res.best:
        assert sim.quick(b.layout).step_time == pytest.approx(b.step_time, rel=0.15)


def test_memory_pruning_loses_no_feasible_layout():
    cfg = from_dict(ModelConfig, SMALL)
    sim = Simulator(cfg, small_hw(memory_gb=0.2), 16)
    space = small_space(tp=[1, 2], vpp=[1], cp=[1])
    pruned = search_layouts(sim, space, rerank=0, keep_infeasible=False)
    brute = search_layouts(sim, space, rerank=0, keep_infeasible=False, prune_memory=False)
    assert brute.evaluated > pruned.evaluated
    assert sorted(r["layout"] for r in pruned.rows) == sorted(r["layout"] for r in brute.rows)


def test_model_search_respects_budget_and_reports_impossible_budgets():
    base = from_dict(ModelConfig, SMALL)
    lspace = small_space(tp=[1, 2], pp=[1, 2], vpp=[1], cp=[1], ep=[1, 4], micro_batch_size=[1],
                         recompute=["selective"], swap=[False], optimizer_offload=[False], zero1=[True])
    mspace = ModelSpace(hidden_size=[256, 512], num_layers=[6], num_experts=[16, 32], top_k=[2],
                        expert_ffn_size=[256], num_shared_experts=[1], total_params_min=0,
                        total_params_max=60e6, activated_params_min=0, activated_params_max=20e6)
    rows = search_models(base, small_hw(memory_gb=4.0), 16, mspace, lspace)
    assert rows and all(r["total_params_b"] * 1e9 <= 60e6 and r["activated_params_b"] * 1e9 <= 20e6 for r in rows)
    assert [r["tokens_per_s"] for r in rows] == sorted((r["tokens_per_s"] for r in rows), reverse=True)
    mspace.total_params_max = 1e3  # below every candidate
    with pytest.raises(ConfigError, match="model_space: no model"):
        search_models(base, small_hw(memory_gb=4.0), 16, mspace, lspace)


@pytest.mark.parametrize("recipe", ["pangu_718b_6k_910b", "deepseek_v3_2k_h800"])
def test_shipped_estimates_are_fast_and_complete(recipe):
    r = load_sim_recipe(ROOT / "configs" / "simulator" / f"{recipe}.yaml")
    sim = Simulator(r.model, load_hardware(r.hardware), r.num_devices, r.options)
    t0 = time.process_time()
    est = sim.estimate(r.layout)
    assert time.process_time() - t0 < 1.0
    b = est.breakdown
    parts = sum(v for k, v in b.items() if k != "total")
    assert parts == pytest.approx(est.step_time, rel=1e-6)
    assert 0.05 < est.mfu < 0.6 and est.tokens_per_s > 0
    assert est.memory["total"] == pytest.approx(sum(v for k, v in est.memory.items() if k != "total"))


def test_hardware_profiles_load():
    for name in ("ascend_910b_a2", "ascend_a3_supernode", "nvidia_h100", "nvidia_h800"):
        hw = load_hardware(name)
        assert hw.peak_flops("bf16") > 1e14 and hw.devices_per_node >= 8
    with pytest.raises(ConfigError, match="hardware: unknown profile 'tpu9'.*ascend_910b_a2"):
        load_hardware("tpu9")
    with pytest.raises(ConfigError, match="options.dtype: profile 'ascend_910b_a2' has no peak for 'fp8'"):
        Simulator(from_dict(ModelConfig, SMALL), load_hardware("ascend_910b_a2"), 8, SimOptions(dtype="fp8"))


def test_cli_estimate_search_and_errors(tmp_path, capsys):
    pangu = str(ROOT / "configs" / "simulator" / "pangu_718b_6k_910b.yaml")
    trace = tmp_path / "trace.json"
    assert main(["estimate", "--recipe", pangu, "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "bubble" in out and "heaviest operators" in out
    assert json.loads(trace.read_text())["traceEvents"]
    # bad input: one line each, exit status 2
    assert main(["estimate", "--recipe", pangu, "--hardware", "tpu9"]) == 2
    assert "unknown profile 'tpu9'" in capsys.readouterr().err
    assert main(["estimate", "--recipe", pangu, "--set", "layout.tp=3"]) == 2
    err = capsys.readouterr().err
    # TP-extend-EP folds tp=3 into ep*tp = 12 expert ranks, which 256 experts do not split over
    assert err.startswith("error: layout.ep: model.num_experts=256 is not divisible by ep*tp=12"), err
    assert main(["estimate", "--recipe", pangu, "--set", "layout.tpp=2"]) == 2
    assert "did you mean 'tp'" in capsys.readouterr().err
    small = tmp_path / "small.yaml"
    small.write_text(json.dumps({"model": SMALL, "hardware": "nvidia_h100", "num_devices": 16,
                                 "layout": {"global_batch_size": 32, "seq_len": 512},
                                 "layout_space": {"tp": [1, 2], "pp": [1, 2], "vpp": [1], "ep": [1, 4]}}))
    assert main(["search", "--recipe", str(small), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    for f in ("layouts.csv", "search.json", "pareto.png", "best_timeline.json"):
        assert (tmp_path / "s" / f).stat().st_size > 0
    capsys.readouterr()
    assert main(["search", "--recipe", str(small), "--out", str(tmp_path / "m"), "--models", "--no-progress",
                 "--set", "model_space.total_params_min=0", "model_space.total_params_max=10"]) == 2
    assert "no model in the space" in capsys.readouterr().err


def test_yaml_configs_load():
    assert load_model_config(ROOT / "configs" / "models" / "pangu_ultra_moe_718b.yaml").num_layers == 61
    from simulator.validate import load_validate_config
    from simulator.validate_models import ModelCheckConfig
    for p in (ROOT / "configs" / "simulator").glob("*.yaml"):
        if p.name.startswith("validate_models"):
            assert from_dict(ModelCheckConfig, load_yaml(p), "model check").best > 0
        elif p.name.startswith("validate"):
            assert load_validate_config(p).cases
        else:
            load_sim_recipe(p)
