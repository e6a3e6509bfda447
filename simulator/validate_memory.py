"""Memory cases of `simulate validate`: the trainer runs a few steps under a recipe's `memory:`
policy and a layout, and the bytes it measures (parallel/memory.py: activations saved for backward
at their peak, bytes swapped to host, optimizer states on the device and on the host) are compared
with the simulator's prediction for the same layout and policy: simulator/memory.py's formulas
through the cost model, the estimate's own memory figures (one formula source).

Memory does not drift with the machine's load, so a case runs `memory_steps` steps and compares
the last one. The routing's expert-parallel load imbalance is an input of the formulas (the busiest
rank computes the most expert rows), not a prediction: the one the step produced is used. With
several ranks the measured figure is the largest over the ranks, as the simulator predicts the
device with the highest peak. Target: every compared quantity within 10 %.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from moe.config import ModelConfig
from simulator.cost import Simulator
from simulator.hardware import HardwareProfile
from simulator.validate import MemoryCase, case_layout, run_case, scaled_profile, sim_options

TARGET_PCT = 10.0
# quantity -> the worker's measured metric (parallel/memory.py)
MEASURED = {"activations": "mem_saved_activation_peak_bytes", "swapped": "mem_swapped_bytes",
            "optimizer_device": "mem_optimizer_device_bytes", "optimizer_host": "mem_optimizer_host_bytes"}


def memory_layout(c: MemoryCase):
    """The case as a simulator layout carrying its whole `memory:` section (the coarse fields, which
    drive the time model, set to its summary)."""
    rec, swap, offload = c.memory.summary()
    lay = replace(case_layout(c), recompute=rec, swap=swap, optimizer_offload=offload, memory_policy=c.memory)
    lay.validate("layout")
    return lay


def predict_memory(model: ModelConfig, hw: HardwareProfile, c: MemoryCase, imbalance: float = 1.0) -> dict:
    """Predicted bytes of one step on the device with the highest peak; with pipeline stages,
    `per_stage` holds each pipeline rank's (the first ones hold more micro-batches in flight)."""
    sim = Simulator(model, scaled_profile(hw, 1.0), c.world, sim_options(imbalance, c.world))
    lay = memory_layout(c)
    est = sim.estimate(lay)
    d = est.derived
    pipe = sim.pipe(lay, d)
    # every micro-batch of the step copies its layers' swapped tensors out once (the cost model
    # keeps the largest chunk's bytes per micro-batch: a rank's whole stage without virtual stages)
    out = {"activations": est.memory["activations"], "swapped": max(pipe.swapped) * d.micro_batches,
           "optimizer_device": est.memory["optimizer"], "optimizer_host": est.memory["optimizer_host"]}
    if lay.pp > 1:
        out["per_stage"] = [{"activations": est.stage_activations[r],
                             "swapped": pipe.swapped[pipe.group[r]] * d.micro_batches} for r in range(lay.pp)]
    return out


def measured_memory(ranks: list[list[dict]], pp: int = 1) -> dict:
    """The last step's bytes, the largest over the ranks, and the routing imbalance it produced;
    with `pp` pipeline ranks (one rank per stage), `per_stage` holds each rank's."""
    last = [r[-1] for r in ranks]
    missing = [key for key in MEASURED.values() if key not in last[0]]
    if missing:
        raise RuntimeError(f"the trainer reported no {', '.join(missing)} (memory.measure off?)")
    out = {q: max(x[key] for x in last) for q, key in MEASURED.items()}
    if pp > 1:
        out["per_stage"] = [{q: x[MEASURED[q]] for q in ("activations", "swapped")} for x in last]
    out["ep_imbalance"] = max(1.0, last[0].get("ep_imbalance", 1.0))
    return out


def error_pct(pred: float, meas: float) -> Optional[float]:
    """Relative error of the prediction; None where both are zero (nothing to compare)."""
    if meas == 0:
        return None if pred == 0 else float("inf")
    return 100 * (pred - meas) / meas


def compare(pred: dict, meas: dict) -> dict:
    """Per quantity: predicted and measured MiB and the error; with pipeline stages, activations and
    swapped bytes rank by rank (the row shows the rank with the largest error)."""
    row = {}
    for q in MEASURED:
        pairs = [(pred[q], meas[q])]
        if "per_stage" in pred and q in pred["per_stage"][0]:
            pairs = [(p[q], m[q]) for p, m in zip(pred["per_stage"], meas["per_stage"])]
        errs = [error_pct(p, m) for p, m in pairs]
        i = max(range(len(pairs)), key=lambda j: -1.0 if errs[j] is None else abs(errs[j]))
        row[f"predicted_{q}_mb"], row[f"measured_{q}_mb"] = pairs[i][0] / 2**20, pairs[i][1] / 2**20
        row[f"{q}_error_pct"] = errs[i]
    errs = [abs(row[f"{q}_error_pct"]) for q in MEASURED if row[f"{q}_error_pct"] is not None]
    row["max_abs_error_pct"] = max(errs) if errs else 0.0
    row["pass"] = row["max_abs_error_pct"] <= TARGET_PCT
    return row


def run_memory_cases(model: ModelConfig, hw: HardwareProfile, cases: list[MemoryCase], steps: int, threads: int,
                     workdir: Path, only: Optional[list[str]] = None, log: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for c in cases:
        if only and c.name not in only:
            continue
        row = {"case": c.name, "world": c.world, "tp": c.parallel.tp, "ep": c.parallel.expert_parallel,
               "pp": c.parallel.pp, "zero1": c.parallel.zero1, "memory": c.memory.summary(),
               "recompute": list(c.memory.recompute), "full_layers": c.memory.full_layers,
               "swap": list(c.memory.swap), "optimizer_offload": c.memory.optimizer_offload}
        ranks = run_case(model, c, steps, threads, workdir / "memory")
        if isinstance(ranks, dict):
            row.update(note=ranks["error"], max_abs_error_pct=None)
            row["pass"] = False
        else:
            meas = measured_memory(ranks, c.parallel.pp)
            row.update(compare(predict_memory(model, hw, c, meas["ep_imbalance"]), meas),
                       ep_imbalance=meas["ep_imbalance"], note="")
        rows.append(row)
        log(memory_line(row))
    return rows


def memory_line(r: dict) -> str:
    """One case as the log shows it: predicted / measured MiB and the error of each quantity."""
    measured = r["max_abs_error_pct"] is not None
    parts = [f"{q} {r[f'predicted_{q}_mb']:.2f}/{r[f'measured_{q}_mb']:.2f} MiB ({r[f'{q}_error_pct']:+.1f}%)"
             for q in MEASURED if measured and r[f"{q}_error_pct"] is not None]
    return f"  {r['case']:<26} " + ("predicted/measured: " + ", ".join(parts) if measured
                                    else f"not measured: {r['note']}")


def summarize_memory(rows: list[dict]) -> dict:
    errs = [r["max_abs_error_pct"] for r in rows if r["max_abs_error_pct"] is not None]
    return {"memory_cases": len(rows), "memory_measured": len(errs),
            "memory_max_abs_error_pct": max(errs) if errs else None,
            "memory_pass": bool(rows) and all(r["pass"] for r in rows)}


def run_memory_validation(hw_path, config, workdir: Optional[Path] = None, only: Optional[list[str]] = None,
                          log: Callable[[str], None] = print) -> list[dict]:
    """Every memory case of the validation config (no timing: the machine's load does not matter)."""
    import tempfile

    from simulator.hardware import load_hardware
    from simulator.validate import load_validate_config
    hw = load_hardware(hw_path)
    cfg = load_validate_config(config)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="simvalidate-mem-"))
    if any(not only or c.name in only for c in cfg.memory_cases):
        log("memory cases (predicted / measured bytes of one step)")
    return run_memory_cases(cfg.model, hw, cfg.memory_cases, cfg.memory_steps, max(1, hw.cpu_threads), workdir,
                            only, log)


MEMORY_COLUMNS = ["case", "world", "tp", "ep", "zero1", "recompute", "full_layers", "swap", "optimizer_offload",
                  "ep_imbalance"] + [c for q in MEASURED for c in
                                     (f"predicted_{q}_mb", f"measured_{q}_mb", f"{q}_error_pct")] + ["note"]
