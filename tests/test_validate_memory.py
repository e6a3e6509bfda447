"""The simulator's memory formulas against the trainer's measured bytes (issue 12): for a few
`memory:` policies of `simulate validate`'s memory cases, run in this process through the trainer's
public set-up and step (as launch/validate_worker.py runs them), the predicted saved-activation
bytes at peak, bytes swapped to host and optimizer bytes on the device and the host are each within
10 % of the measurement. The prediction comes from simulator/memory.py through the cost model; the
measurement from parallel/memory.py's saved-tensor hooks and the optimizer's state."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from launch.trainer.recipe import load_recipe
from launch.trainer.setup import build_context
from parallel.memory_config import MemoryConfig
from simulator.hardware import load_hardware
from simulator.validate import MemoryCase, case_recipe, load_validate_config
from simulator.validate_memory import MEASURED, TARGET_PCT, compare, measured_memory, predict_memory

ROOT = Path(__file__).resolve().parents[1]
CASES = {c.name: c for c in load_validate_config().memory_cases}


def measure_in_process(c: MemoryCase, tmp: Path, steps: int = 2) -> list[list[dict]]:
    path = tmp / f"{c.name}.yaml"
    path.write_text(yaml.safe_dump(case_recipe(load_validate_config().model, c, steps, tmp / c.name)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = build_context(load_recipe(path), log=False, measure_peak=False)
        return [[ctx.train_step(step) for step in range(steps)]]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["mem-selective-swap", "mem-expert-ffn-full1-swap", "mem-moe-permute", "mem-offload"])
def test_predicted_memory_within_ten_percent(name, tmp_path):
    c = CASES[name]
    meas = measured_memory(measure_in_process(c, tmp_path))
    row = compare(predict_memory(load_validate_config().model, load_hardware(ROOT / "configs/hardware/cpu_calibrated.yaml"),
                                 c, meas["ep_imbalance"]), meas)
    errs = {q: row[f"{q}_error_pct"] for q in MEASURED}
    assert row["pass"], f"{name}: errors {errs} (target {TARGET_PCT}%)"
    # each case exercises what it names: something swapped, or the optimizer on the host
    if c.memory.swap:
        assert meas["swapped"] > 0 and errs["swapped"] is not None
    if c.memory.optimizer_offload:
        assert meas["optimizer_device"] == 0 and meas["optimizer_host"] > 0


def test_prediction_follows_the_policy_kind_by_kind():
    """Each recompute kind alone predicts less than none, and a swap moves bytes: the formulas read
    the whole `memory:` section, not just the coarse recompute/swap fields it summarises to."""
    hw = load_hardware(ROOT / "configs/hardware/cpu_calibrated.yaml")
    model = load_validate_config().model
    base = CASES["mem-none"]
    none = predict_memory(model, hw, base)
    for kind in ("norm", "swiglu", "mla_up", "core_attention", "expert_ffn", "moe_permute"):
        p = predict_memory(model, hw, replace(base, memory=MemoryConfig(recompute=[kind])))
        assert p["activations"] < none["activations"], kind
    sel = predict_memory(model, hw, replace(base, memory=MemoryConfig(recompute=["norm"])))
    assert sel != predict_memory(model, hw, replace(base, memory=MemoryConfig(recompute=["swiglu"])))
    sw = predict_memory(model, hw, replace(base, memory=MemoryConfig(swap=["core_attention"])))
    assert sw["swapped"] > 0 and sw["activations"] + sw["swapped"] >= none["activations"] - 1


def test_swap_copies_each_saved_span_once():
    """parallel/swap.py: a tensor two ops save (two linears sharing an input) and another view of a
    saved span (softmax's output, saved again reshaped by the next matmul) go to host once each
    (before, each save was copied: 5 copies here instead of 3),
    which is what the simulator's swap formulas count; gradients equal the unswapped run's."""
    import torch.nn.functional as F

    from parallel.swap import HostSwap
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, requires_grad=True)
    w1, w2, w3 = (torch.randn(32, 32, requires_grad=True) for _ in range(3))

    def run(swap):
        h = x * 2  # an activation of 2 x 8 x 32 fp32 = 2 KiB, saved by both linears
        with swap.region() if swap else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            p = torch.softmax(F.linear(h, w1), -1)  # softmax keeps p
            loss = F.linear(h, w2).sum() + (p.reshape(16, 32) @ w3).square().sum()  # mm keeps p's 2-D view
        return torch.autograd.grad(loss, (x, w1, w2, w3))

    weights = {w.untyped_storage().data_ptr() for w in (w1, w2, w3)}  # parameters stay, as in the model
    swap = HostSwap("cpu", static=lambda t: t.untyped_storage().data_ptr() in weights)
    swap.reset()
    got = run(swap)
    assert swap.swapped_bytes == 3 * 2 * 8 * 32 * 4  # h, p and the square's input, one copy each
    for a, b in zip(got, run(None)):
        assert torch.equal(a, b)


def test_bad_memory_case_or_layout_is_one_clear_error():
    from config import ConfigError
    from simulator.layout import Layout
    pol = MemoryConfig(recompute=["layer"])
    with pytest.raises(ConfigError, match=r"layout\.recompute/swap/optimizer_offload: .* set them to its summary"):
        Layout(dispatcher="local", recompute="none", memory_policy=pol).validate("layout")
    Layout(dispatcher="local", recompute="full", memory_policy=pol).validate("layout")  # consistent: fine
    case = replace(CASES["mem-pp2"], world=4)
    with pytest.raises(ConfigError, match=r"cases\.world: .*one rank per stage; set world: 2"):
        case.validate("cases")
    from simulator.validate import load_validate_config
    cfg = load_validate_config()
    with pytest.raises(ConfigError, match=r"^memory_steps: must be >= 1 .*got 0$"):
        replace(cfg, memory_steps=0).validate()
