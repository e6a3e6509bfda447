"""Validation: run the real trainer on this machine under several layouts and compare the measured
step time and activation memory with the simulator's predictions from a calibrated CPU profile.

Each case becomes a training recipe, run in fresh processes with the profile's torch thread count
by the trainer's `launch/validate_worker.py`, which sets up the model, optimizer, data and (under torchrun) the parallel
runtime exactly as `launch.train.run` does and calls its `train_step`. Other jobs' time slices
are not the trainer's cost: a step's *busy time* is its wall time less the time its ranks sat on a
run queue while other processes held the cores (see `dedicated_step_time`). The measured step
time is the median post-warm-up step's busy time.

This machine's speed drifts by more than the accuracy target (the same step measured 163 ms and
207 ms a minute apart: other tenants of the host), and a case's ranks share its cores, caches and
memory bandwidth, unlike the devices of a cluster. So after every step, on all ranks at once, the
worker runs the speed probe (`probe.py`, fixed shapes, independent of the model under test) and
the prediction uses the profile scaled by the probe's ratio to its calibration baseline: the
simulator predicts the step on the machine as it was during the step. The prediction from the
calibration alone (with its measured concurrency slowdown for N ranks) is reported beside it.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import yaml

from config import ConfigError, from_dict, load_yaml
from moe.config import ModelConfig
from simulator.cost import SimOptions, Simulator
from simulator.hardware import HardwareProfile, load_hardware
from simulator.bands import layout_features
from simulator.machine import profile_mismatch, quick_probe
from parallel.config import ParallelConfig
from parallel.memory_config import MemoryConfig
from simulator.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "simulator" / "validate_cpu.yaml"
# The trainer's timed-steps entry point, run in fresh processes: the simulator never imports the trainer.
WORKER = "launch.validate_worker"


@dataclass
class Case:
    """One validation run: a world size, the batch shape, and the runtime's own `parallel:` section."""

    name: str
    world: int = 1
    micro_batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dispatcher="local"))

    def validate(self, path: str = "") -> None:
        if self.world < 1:
            raise ConfigError(f"{path}.world: must be >= 1, got {self.world}")

    def parallel_section(self) -> ParallelConfig:
        """The case's layout as the trainer runs it: nodes no larger than the world."""
        return replace(self.parallel, devices_per_node=min(self.parallel.devices_per_node, self.world))


@dataclass
class MemoryCase(Case):
    """A memory case: a layout plus the recipe's `memory:` section (simulator/validate_memory.py)."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self, path: str = "") -> None:
        super().validate(path)
        self.memory.validate(f"{path}.memory")
        if self.parallel.pp > 1 and self.world != self.parallel.pp:
            raise ConfigError(f"{path}.world: a pipeline memory case compares rank by rank, one rank per stage; "
                              f"set world: {self.parallel.pp} (= parallel.pp)")


@dataclass
class ValidateConfig:
    model: ModelConfig
    cases: list[Case] = field(default_factory=list)
    steps: int = 7
    warmup_steps: int = 2
    memory_cases: list[MemoryCase] = field(default_factory=list)
    memory_steps: int = 2  # memory is deterministic given the routing: the last step is compared

    def validate(self, path: str = "") -> None:
        if self.steps <= self.warmup_steps:
            raise ConfigError(f"steps: must exceed warmup_steps={self.warmup_steps}, got {self.steps}")
        if not self.cases:
            raise ConfigError("cases: give at least one case")
        if self.memory_steps < 1:
            raise ConfigError(f"memory_steps: must be >= 1 (the last step's memory is compared), got {self.memory_steps}")


def load_validate_config(path: str | Path = DEFAULT_CONFIG) -> ValidateConfig:
    return from_dict(ValidateConfig, load_yaml(path))


def case_layout(c: Case) -> Layout:
    """The case as a simulator layout: its `parallel:` section plus the batch it trains."""
    par = c.parallel_section()
    dp = par.data_parallel(c.world)
    # asdict would turn emulate_links into a mapping: the layout keeps the object
    return Layout(**{**asdict(par), "emulate_links": par.emulate_links}, micro_batch_size=c.micro_batch_size,
                  seq_len=c.seq_len, recompute="none",
                  global_batch_size=c.micro_batch_size * c.grad_accum * dp)


def scaled_profile(hw: HardwareProfile, slowdown: float) -> HardwareProfile:
    """The profile on a machine whose compute-side work (GEMMs, element-wise operators and their
    fixed costs, memory traffic, the optimizer step) runs `slowdown` times as long. Collective links
    are left as calibrated, and so are the profile's corrections (the simulator applies them)."""
    return hw.scaled(slowdown, slowdown, slowdown)


def case_profile(hw: HardwareProfile, c: Case) -> HardwareProfile:
    """The profile as one rank of this case sees it from the calibration alone: ranks running at
    once on one machine slow one another by the calibrated `concurrency_slowdown` (a factor below 1
    is noise: clamped)."""
    if c.world == 1:
        return scaled_profile(hw, 1.0)
    if c.world not in hw.concurrency_slowdown:
        raise ConfigError(f"hardware.concurrency_slowdown: profile {hw.name!r} has no factor for {c.world} "
                          f"concurrent ranks (case {c.name}); re-run `python -m simulator calibrate` "
                          f"without --no-collectives")
    return scaled_profile(hw, max(1.0, hw.concurrency_slowdown[c.world]))


def sim_options(imbalance: float = 1.0, world: int = 1) -> SimOptions:
    """The modelling options that describe this trainer: fp32 on CPU, the fast kernels' single
    grouped GEMM when torch provides one, the shared expert overlapped with the dispatch, and the
    gradient all-reduce after the backward pass through flat buckets (`parallel.data_parallel`,
    which runs on several ranks only)."""
    import torch
    from moe_kernels.fast import grouped_mm_works
    return SimOptions(dtype="fp32", grouped_gemm_per_expert=not grouped_mm_works("cpu", torch.float32),
                      overlap_grad_reduce=False, overlap_param_gather=False, pad_layers=False,
                      expert_imbalance=max(1.0, imbalance), grad_bucket_copy=world > 1)


def predict(model: ModelConfig, hw: HardwareProfile, c: Case, imbalance: float = 1.0,
            slowdown: Optional[float] = None) -> dict:
    """Step time and activation bytes of one case. `slowdown`: the machine's measured slowdown during
    the case (the speed probe's ratio, concurrency included); without it, the calibration's."""
    prof = scaled_profile(hw, slowdown) if slowdown else case_profile(hw, c)
    prof = prof.with_emulated_links(c.parallel.emulate_links)  # emulated-link cases (validate_links_cpu.yaml)
    sim = Simulator(model, prof, c.world, sim_options(imbalance, c.world))
    est = sim.estimate(case_layout(c))
    T = c.micro_batch_size * c.seq_len
    saved = est.memory["activations"]
    bubble = None
    if c.parallel.pp > 1 and est.timeline is not None:
        # what the trainer measures: per pipeline rank, the part of its schedule time that is not
        # its own work (compute and in-stage communication), averaged over the ranks
        fin = est.timeline.finish
        bubble = sum(1 - busy / f for busy, f in zip(est.stage_busy, fin) if f > 0) / len(fin)
    return {"step_time_s": est.step_time, "activation_bytes": saved, "tokens": T, "bubble_fraction": bubble,
            "compute_s": est.breakdown["compute"], "optimizer_s": est.breakdown["optimizer"],
            "step_time_band_s": est.step_time_band}


def case_features(c: Case) -> list[str]:
    """What the case exercises, in the terms of the error bands (simulator/bands.py)."""
    par = c.parallel
    return sorted(layout_features(tp=par.tp, ep=par.expert_parallel, dp=par.data_parallel(c.world), pp=par.pp,
                                  vpp=par.vpp, cp=par.cp, tp_extend_ep=par.tp_extend_ep,
                                  dispatcher=par.dispatcher, zero1=par.zero1, rank_order=par.rank_order))


def case_recipe(model: ModelConfig, c: Case, steps: int, out_dir: Path) -> dict:
    """The trainer recipe (as a dict) that runs case `c`."""
    return {
        "model": asdict(model),
        "train": {"steps": steps, "micro_batch_size": c.micro_batch_size, "grad_accum": c.grad_accum,
                  "seq_len": c.seq_len, "dtype": "fp32", "device": "cpu", "warmup_steps": 1, "log_interval": 1,
                  "eval_batches": 1, "out_dir": str(out_dir), "tensorboard": False, "progress": False},
        "data": {"path": "embedded", "tokenizer": "byte", "cache_dir": str(ROOT / "data")},
        "parallel": asdict(c.parallel_section()),
        **({"memory": asdict(c.memory)} if isinstance(c, MemoryCase) else {}),
    }


def measure(model: ModelConfig, c: Case, steps: int, warmup: int, threads: int, workdir: Path,
            timeout_s: float = 600.0) -> dict:
    """Run the trainer for one case (`validate_worker`, under torchrun for several ranks); return the
    median post-warm-up step's busy time (of its slowest rank), the median wall time, and the median
    speed probe (of the slowest rank, seconds) around those steps."""
    ranks = run_case(model, c, steps, threads, workdir, timeout_s)
    return ranks if isinstance(ranks, dict) else aggregate_steps(ranks, warmup)


def run_case(model: ModelConfig, c: Case, steps: int, threads: int, workdir: Path,
             timeout_s: float = 600.0) -> "list[list[dict]] | dict":
    """The worker's per-rank step records for one case, or {"error": why}."""
    out_dir = workdir / c.name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    recipe_path = out_dir / "recipe.in.yaml"
    recipe_path.write_text(yaml.safe_dump(case_recipe(model, c, steps, out_dir), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    prefix = out_dir / "steps"
    worker = ["-m", WORKER, str(recipe_path), str(steps), str(prefix)]
    if c.world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={c.world}", *worker]
    else:
        cmd = [sys.executable, *worker]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()] or ["no output"]
        errs = [x for x in lines if "Error" in x] or lines
        return {"error": f"trainer exited {proc.returncode}: {errs[-1][:160]}"}
    ranks = [json.loads(p.read_text())["steps"] for p in sorted(out_dir.glob("steps.rank*.json"))]
    if len(ranks) != c.world or any(len(r) != steps for r in ranks):
        return {"error": f"expected {c.world} ranks with {steps} steps each"}
    return ranks


def aggregate_steps(ranks: list[list[dict]], warmup: int) -> dict:
    """Per-rank step records (`validate_worker`) -> the case's measurement: per step the busy time
    of the ranks together and the slowest rank's probe; medians over the steps after `warmup`."""
    steps = len(ranks[0])
    imbalance = statistics.median(r[i].get("ep_imbalance", 1.0) for r in ranks for i in range(warmup, steps))
    busy = [dedicated_step_time([r[i] for r in ranks]) for i in range(warmup, steps)]
    wall = [max(r[i]["wall_s"] for r in ranks) for i in range(warmup, steps)]
    probe = statistics.median(max(r[i]["probe"] for r in ranks) for i in range(warmup, steps))
    out = {"step_time_s": statistics.median(busy), "fastest_s": min(busy), "wall_s": statistics.median(wall),
           "steps": steps - warmup, "ep_imbalance": imbalance, "probe_s": probe}
    if "bubble_fraction" in ranks[0][0]:  # pipeline cases: the same mean over ranks on every rank
        out["bubble_fraction"] = statistics.median(ranks[0][i]["bubble_fraction"] for i in range(warmup, steps))
    return out


def dedicated_step_time(ranks: list[dict]) -> float:
    """One step's time on cores of its own: the wall time less every rank's run-queue delay. Ranks
    synchronise many times a step, so while one sits preempted the others soon wait for it: each
    rank's lost time slices stretch the step once (exactly so when they do not overlap; when they
    do, this subtracts too much, so it is floored at the busiest rank's CPU time)."""
    wall = max(x["wall_s"] for x in ranks)
    return max(max(x["cpu_s"] for x in ranks), wall - sum(x["run_delay_s"] for x in ranks))


def measure_activations(model: ModelConfig, c: Case) -> Optional[int]:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (one micro-batch)."""
    if c.world > 1:
        return None
    import torch
    from moe_kernels import get_kernels
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
    if not hw.speed_probe:
        raise ConfigError(f"hardware.speed_probe: profile {hw.name!r} has no speed-probe baseline (calibrated "
                          f"by an older version); re-run `python -m simulator calibrate`")
    warning = profile_mismatch(hw, quick_probe(threads))
    if warning:
        log(warning)
    rows = []
    for c in cfg.cases:
        if only and c.name not in only:
            continue
        meas = measure(cfg.model, c, cfg.steps, cfg.warmup_steps, threads, workdir)
        # The routing's load imbalance is an input of the cost model, not something it predicts:
        # use the one the run produced (1.0 without expert parallelism).
        imb = meas.get("ep_imbalance", 1.0)
        raw = predict(cfg.model, hw, c, imbalance=imb)
        row = {"case": c.name, "world": c.world, "tp": c.parallel.tp, "ep": c.parallel.expert_parallel, "pp": c.parallel.pp, "vpp": c.parallel.vpp,
               "dispatcher": c.parallel.dispatcher,
               "micro_batch_size": c.micro_batch_size, "grad_accum": c.grad_accum, "seq_len": c.seq_len,
               "ep_imbalance": imb, "features": case_features(c)}
        if "error" in meas:
            row.update(machine_slowdown=None, predicted_s=raw["step_time_s"], measured_s=None,
                       error_pct=None, calibration_only_s=raw["step_time_s"], calibration_only_error_pct=None,
                       fastest_s=None, wall_s=None, note=meas["error"])
        else:
            slowdown = meas["probe_s"] / hw.speed_probe
            pred = predict(cfg.model, hw, c, imbalance=imb, slowdown=slowdown)
            m = meas["step_time_s"]
            row.update(machine_slowdown=slowdown, predicted_s=pred["step_time_s"],
                       measured_s=m, error_pct=100 * (pred["step_time_s"] - m) / m,
                       calibration_only_s=raw["step_time_s"],
                       calibration_only_error_pct=100 * (raw["step_time_s"] - m) / m,
                       fastest_s=meas["fastest_s"], wall_s=meas["wall_s"], note="")
            band = pred["step_time_band_s"]  # from the profile's previous validation, if any
            row.update(band_low_s=band[0] if band else None, band_high_s=band[1] if band else None,
                       in_band=(band[0] <= m <= band[1]) if band else None)
            if pred["bubble_fraction"] is not None and "bubble_fraction" in meas:
                row.update(predicted_bubble=pred["bubble_fraction"], measured_bubble=meas["bubble_fraction"],
                           bubble_error_pts=100 * (pred["bubble_fraction"] - meas["bubble_fraction"]))
        act = measure_activations(cfg.model, c)
        row["predicted_act_mb"] = raw["activation_bytes"] / 2**20
        row["measured_act_mb"] = act / 2**20 if act is not None else None
        row["act_error_pct"] = (100 * (raw["activation_bytes"] - act) / act) if act else None
        rows.append(row)
        log(_case_line(row))
    return rows


def _case_line(r: dict) -> str:
    if r["measured_s"] is None:
        return f"  {r['case']:<22} predicted {r['predicted_s']:.4f} s, not measured: {r['note']}"
    return (f"  {r['case']:<22} predicted {r['predicted_s']:.4f} s, measured {r['measured_s']:.4f} s: "
            f"{r['error_pct']:+.1f}% (machine slowdown x{r['machine_slowdown']:.2f}; "
            f"calibration alone {r['calibration_only_error_pct']:+.1f}%)"
            + (f"; bubble predicted {100 * r['predicted_bubble']:.1f}%, measured {100 * r['measured_bubble']:.1f}% "
               f"({r['bubble_error_pts']:+.1f} points)" if r.get("bubble_error_pts") is not None else ""))


def summarize(rows: list[dict]) -> dict:
    """Pass/fail on the probe-corrected errors; the calibration-only errors are reported beside them."""
    errs = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    raw = [abs(r["calibration_only_error_pct"]) for r in rows if r["calibration_only_error_pct"] is not None]
    acts = [abs(r["act_error_pct"]) for r in rows if r["act_error_pct"] is not None]
    banded = [r["in_band"] for r in rows if r.get("in_band") is not None]
    bubbles = [abs(r["bubble_error_pts"]) for r in rows if r.get("bubble_error_pts") is not None]
    return {"cases": len(rows), "measured": len(errs),
            "in_band": sum(banded), "with_band": len(banded),
            "median_abs_error_pct": statistics.median(errs) if errs else None,
            "max_abs_error_pct": max(errs) if errs else None,
            "calibration_only_median_abs_error_pct": statistics.median(raw) if raw else None,
            "calibration_only_max_abs_error_pct": max(raw) if raw else None,
            "median_abs_act_error_pct": statistics.median(acts) if acts else None,
            "max_abs_bubble_error_pts": max(bubbles) if bubbles else None,
            # pipeline cases also need the measured bubble fraction within 5 points of the prediction
            "pass": bool(errs) and statistics.median(errs) <= 15 and max(errs) <= 30 and all(b <= 5 for b in bubbles)}
