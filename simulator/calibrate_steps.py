"""Calibration from real training steps of a small held-out model (`CALIBRATION_MODEL`, not the
validation model): what the microbenchmarks miss, fitted as the profile's `work_correction` and
`overhead_correction`. One process at three sizes; the forward + backward time is fitted as
work x modelled work + overhead x modelled fixed costs (Python, modules and autograd around each
operator; the allocator under a step's live tensors). `calibrate.py` calls it after its
microbenchmarks."""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from simulator.hardware import CalibrationError, HardwareProfile
from simulator.opbench import fit_two

# The held-out model: a small MoE unlike `configs/simulator/validate_cpu.yaml` (narrower, 3 layers,
# 4 sigmoid-routed experts, no MTP).
CALIBRATION_MODEL = {
    "vocab_size": 256, "hidden_size": 128, "num_layers": 3, "max_seq_len": 128, "attention": "mla",
    "num_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 48, "qk_nope_head_dim": 24, "qk_rope_head_dim": 8,
    "v_head_dim": 24, "dense_ffn_size": 384, "first_k_dense": 1, "num_experts": 4, "top_k": 2,
    "expert_ffn_size": 160, "num_shared_experts": 1, "score_func": "sigmoid", "mtp_layers": 0,
}
# (micro-batch, sequence) of its one-process steps: small ones where fixed costs weigh, a large one
# where work does
CALIBRATION_STEPS = ((1, 64), (2, 128), (8, 128))


def fit_corrections(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(work, overhead) factors with measured = work * W + overhead * F, least squares of the
    relative error over (measured compute, modelled work W, modelled fixed cost F) points, at least
    two with different W/F. Raises when the fit is degenerate or a factor comes out non-positive
    (a noisy machine)."""
    fit = fit_two([(w / m, f / m, 1.0) for m, w, f in points])  # relative errors: small steps count as much
    if fit is None:
        raise CalibrationError("calibration steps: the sizes do not separate fixed from proportional costs")
    work, overhead = fit
    if work <= 0 or overhead <= 0:
        raise CalibrationError(f"calibration steps: fitted work x{work:.2f}, overhead x{overhead:.2f} (must be "
                               f"> 0); the machine was too noisy, run `python -m simulator calibrate` again")
    return work, overhead


def measure_corrections(prof: HardwareProfile, log: Callable[[str], None] = print) -> tuple[float, float]:
    """Train `CALIBRATION_MODEL` in one process (as `validate` runs a case) at the sizes of
    `CALIBRATION_STEPS` and fit the profile's `work_correction` and `overhead_correction` to the
    forward + backward part of each step (measured step less the modelled optimizer step, whose
    calibration is a measured step of its own), each at the speed probe's reading during the run."""
    from config import from_dict
    from moe.config import ModelConfig
    from simulator.validate import Case, measure, predict
    model = from_dict(ModelConfig, CALIBRATION_MODEL, "calibration model")
    bare = replace(prof, work_correction=1.0, overhead_correction=1.0)
    work_only = replace(prof, work_correction=1.0, overhead_correction=0.0)  # fixed costs zeroed
    points = []
    with tempfile.TemporaryDirectory(prefix="simcalibrate-") as d:
        for mbs, seq in CALIBRATION_STEPS:
            case = Case(name=f"calibration-{mbs}x{seq}", micro_batch_size=mbs, seq_len=seq)
            meas = measure(model, case, steps=12, warmup=2, threads=max(1, prof.cpu_threads), workdir=Path(d))
            if "error" in meas:
                raise CalibrationError(f"calibration training step ({case.name}) failed: {meas['error']}")
            slowdown = meas["probe_s"] / prof.speed_probe
            full = predict(model, bare, case, slowdown=slowdown)
            work = predict(model, work_only, case, slowdown=slowdown)["compute_s"]
            measured = meas["step_time_s"] - full["optimizer_s"]
            points.append((measured, work, full["compute_s"] - work))
            log(f"  training step of the calibration model at {mbs}x{seq} tokens: measured "
                f"{meas['step_time_s'] * 1e3:.1f} ms, modelled {full['step_time_s'] * 1e3:.1f} ms (forward + "
                f"backward {full['compute_s'] * 1e3:.1f} ms, of it fixed costs {(full['compute_s'] - work) * 1e3:.1f} ms)")
    return fit_corrections(points)
