"""Validation: run the real trainer on this machine under several layouts and compare the measured
step time and activation memory with the simulator's predictions from a calibrated CPU profile.

Each case becomes a training recipe, run in its own process with the profile's torch thread count:
one process runs the trainer's own build and step functions (`validate_worker.py`); several run
`python -m launch.train` under torchrun. The measured step time is the median over the steps after
the warm-up ones. For one process it is the step's CPU time: this machine is shared, other jobs'
time slices are not the trainer's cost, and the calibration's microbenchmarks use the same clock,
so prediction and measurement both describe a dedicated device (the wall time is reported beside
it). Several processes wait on one another, so there the wall clock is the only honest measure. Activation memory is measured in
this process for single-process cases: the bytes of the distinct storages autograd saves during one
forward of the same model on one micro-batch (saved-tensor hooks), against the simulator's
activations plus the logits the loss keeps.

More processes than cores share them: each rank then gets cores / (ranks * threads) of the machine,
so the profile's compute and memory rates are scaled by that share (a physical correction, not a
fitted one).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional

import yaml

from moe.config import ConfigError, ModelConfig, from_dict, load_yaml
from simulator.cost import SimOptions, Simulator
from simulator.hardware import HardwareProfile, load_hardware
from simulator.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "simulator" / "validate_cpu.yaml"


@dataclass
class Case:
    name: str
    micro_batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    world: int = 1
    ep: int = 1
    dispatcher: Literal["local", "allgather", "alltoall", "hierarchical"] = "local"
    devices_per_node: int = 8
    zero1: bool = False


@dataclass
class ValidateConfig:
    model: ModelConfig
    cases: list[Case] = field(default_factory=list)
    steps: int = 7
    warmup_steps: int = 2

    def validate(self, path: str = "") -> None:
        if self.steps <= self.warmup_steps:
            raise ConfigError(f"steps: must exceed warmup_steps={self.warmup_steps}, got {self.steps}")
        if not self.cases:
            raise ConfigError("cases: give at least one case")


def load_validate_config(path: str | Path = DEFAULT_CONFIG) -> ValidateConfig:
    return from_dict(ValidateConfig, load_yaml(path))


def case_layout(c: Case) -> Layout:
    dp = c.world  # no tp/cp/pp here: every rank is a data-parallel rank (EP splits the experts among them)
    return Layout(tp=1, pp=1, ep=c.ep, micro_batch_size=c.micro_batch_size,
                  global_batch_size=c.micro_batch_size * c.grad_accum * dp, seq_len=c.seq_len,
                  recompute="none", dispatcher=c.dispatcher if c.ep > 1 else "local", zero1=c.zero1,
                  devices_per_node=min(c.devices_per_node, c.world) if c.world > 1 else None)


def case_profile(hw: HardwareProfile, c: Case) -> HardwareProfile:
    """The profile as one rank of this case sees it: cores shared when ranks outnumber them."""
    cores = os.cpu_count() or 1
    share = min(1.0, cores / (c.world * max(1, hw.cpu_threads)))
    if share >= 1.0:
        return hw
    return replace(hw, peak_tflops={k: v * share for k, v in hw.peak_tflops.items()},
                   memory_bandwidth_gbps=hw.memory_bandwidth_gbps * share,
                   op_overhead_us=hw.op_overhead_us / share)


def sim_options() -> SimOptions:
    """The modelling options that describe this trainer: fp32 on CPU, the fast kernels' single
    grouped GEMM when torch provides one, the shared expert overlapped with the dispatch, and the
    gradient all-reduce after the backward pass."""
    import torch
    from kernels.fast import grouped_mm_works
    return SimOptions(dtype="fp32", grouped_gemm_per_expert=not grouped_mm_works("cpu", torch.float32),
                      overlap_grad_reduce=False, overlap_param_gather=False, pad_layers=False)


def predict(model: ModelConfig, hw: HardwareProfile, c: Case) -> dict:
    sim = Simulator(model, case_profile(hw, c), c.world, sim_options())
    est = sim.estimate(case_layout(c))
    T = c.micro_batch_size * c.seq_len
    saved = est.memory["activations"]
    return {"step_time_s": est.step_time, "activation_bytes": saved, "tokens": T}


def _recipe(model: ModelConfig, c: Case, steps: int, out_dir: Path) -> dict:
    from dataclasses import asdict
    return {
        "model": asdict(model),
        "train": {"steps": steps, "micro_batch_size": c.micro_batch_size, "grad_accum": c.grad_accum,
                  "seq_len": c.seq_len, "dtype": "fp32", "device": "cpu", "warmup_steps": 1, "log_interval": 1,
                  "eval_batches": 1, "out_dir": str(out_dir), "tensorboard": False, "progress": False},
        "data": {"path": "embedded", "tokenizer": "byte", "cache_dir": str(ROOT / "data")},
        "parallel": {"ep": c.ep, "dispatcher": c.dispatcher if c.ep > 1 else "local",
                     "devices_per_node": min(c.devices_per_node, c.world), "zero1": c.zero1},
    }


def measure(model: ModelConfig, c: Case, steps: int, warmup: int, threads: int, workdir: Path,
            timeout_s: float = 600.0) -> dict:
    """Run the trainer for one case; return median step times after warm-up (or an error).

    One process: `validate_worker` runs the trainer's build and step functions and times each step
    by wall clock and by CPU time; CPU time is the figure compared (see the module docstring).
    Several processes: `python -m launch.train` under torchrun, wall-clock step times from its
    metrics.jsonl (waiting on a peer must count, so CPU time would not do)."""
    out_dir = workdir / c.name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    recipe_path = out_dir / "recipe.in.yaml"
    recipe_path.write_text(yaml.safe_dump(_recipe(model, c, steps, out_dir), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    result = out_dir / "steps.json"
    if c.world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={c.world}",
               "-m", "launch.train", "--recipe", str(recipe_path), "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "simulator.validate_worker", str(recipe_path), str(steps), str(result)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()] or ["no output"]
        return {"error": f"trainer exited {proc.returncode}: {lines[-1][:160]}"}
    if c.world > 1:
        metrics = out_dir / "metrics.jsonl"
        if not metrics.is_file():
            return {"error": "the trainer wrote no metrics.jsonl"}
        wall = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines() if line.strip()]
        cpu = None
    else:
        rows = json.loads(result.read_text())["steps"]
        wall, cpu = [r["wall_s"] for r in rows], [r["cpu_s"] for r in rows]
    if len(wall) <= warmup:
        return {"error": f"only {len(wall)} steps logged"}
    wall_med = statistics.median(wall[warmup:])
    cpu_med = statistics.median(cpu[warmup:]) if cpu else None
    return {"step_time_s": cpu_med if cpu_med is not None else wall_med, "wall_s": wall_med,
            "clock": "cpu" if cpu_med is not None else "wall", "steps": len(wall) - warmup}


def measure_activations(model: ModelConfig, c: Case) -> Optional[int]:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (one micro-batch)."""
    if c.world > 1:
        return None
    import torch
    from kernels import get_kernels
    from moe.model import MoETransformer
    torch.manual_seed(0)
    net = MoETransformer(model, get_kernels("auto", device_type="cpu"))
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    tokens = torch.randint(0, model.vocab_size, (c.micro_batch_size, c.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(tokens, tokens)
    del out
    return sum(seen.values())


def run_validation(hw_path: str | Path, config: str | Path = DEFAULT_CONFIG, workdir: Optional[Path] = None,
                   only: Optional[list[str]] = None, log: Callable[[str], None] = print) -> list[dict]:
    hw = load_hardware(hw_path)
    if hw.device != "cpu":
        raise ConfigError(f"hardware: validate runs the trainer on this machine's CPU; give a calibrated CPU "
                          f"profile (`python -m simulator calibrate`), not {hw.name!r}")
    cfg = load_validate_config(config)
    threads = max(1, hw.cpu_threads)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="simvalidate-"))
    rows = []
    for c in cfg.cases:
        if only and c.name not in only:
            continue
        pred = predict(cfg.model, hw, c)
        meas = measure(cfg.model, c, cfg.steps, cfg.warmup_steps, threads, workdir)
        row = {"case": c.name, "world": c.world, "ep": c.ep, "dispatcher": c.dispatcher,
               "micro_batch_size": c.micro_batch_size, "grad_accum": c.grad_accum, "seq_len": c.seq_len,
               "predicted_s": pred["step_time_s"]}
        if "error" in meas:
            row.update(measured_s=None, clock="-", wall_s=None, error_pct=None, note=meas["error"])
        else:
            row.update(measured_s=meas["step_time_s"], clock=meas["clock"], wall_s=meas["wall_s"],
                       error_pct=100 * (pred["step_time_s"] - meas["step_time_s"]) / meas["step_time_s"], note="")
        act = measure_activations(cfg.model, c)
        row["predicted_act_mb"] = pred["activation_bytes"] / 2**20
        row["measured_act_mb"] = act / 2**20 if act is not None else None
        row["act_error_pct"] = (100 * (pred["activation_bytes"] - act) / act) if act else None
        rows.append(row)
        log(_case_line(row))
    return rows


def _case_line(r: dict) -> str:
    meas = f"{r['measured_s']:.4f}" if r["measured_s"] is not None else "-"
    err = f"{r['error_pct']:+.1f}%" if r["error_pct"] is not None else r["note"]
    return f"  {r['case']:<22} predicted {r['predicted_s']:.4f} s, measured {meas} s: {err}"


def summarize(rows: list[dict]) -> dict:
    errs = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    acts = [abs(r["act_error_pct"]) for r in rows if r["act_error_pct"] is not None]
    return {"cases": len(rows), "measured": len(errs),
            "median_abs_error_pct": statistics.median(errs) if errs else None,
            "max_abs_error_pct": max(errs) if errs else None,
            "median_abs_act_error_pct": statistics.median(acts) if acts else None,
            "pass": bool(errs) and statistics.median(errs) <= 15 and max(errs) <= 30}
