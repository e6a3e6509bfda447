"""Command line: `python -m simulator {estimate,search,calibrate,validate}`.

    python -m simulator estimate --recipe configs/simulator/pangu_718b_6k_910b.yaml [--trace t.json]
    python -m simulator estimate --model configs/models/deepseek_v3_671b.yaml --hardware nvidia_h800 \\
        --devices 2048 --set layout.pp=16 layout.ep=64 layout.global_batch_size=4096
    python -m simulator search --recipe configs/simulator/pangu_718b_6k_910b.yaml --out runs/search
    python -m simulator search --recipe ... --models --set model_space.activated_params_max=42e9
    python -m simulator calibrate [--out configs/hardware/cpu_calibrated.yaml]
    python -m simulator validate [--hardware configs/hardware/cpu_calibrated.yaml] [--calibrate]

Every configuration error is reported as one line naming the field and the fix (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional


from config import ConfigError, apply_overrides, from_dict, load_yaml, parse_overrides
from simulator.cost import Simulator
from simulator.hardware import CalibrationError, load_hardware
from simulator.machine import profile_mismatch, quick_probe
from simulator.recipe import SimRecipe, sim_recipe_from_dict
from simulator.report import (describe, estimate_dict, model_line, pareto_front, pareto_plot, table, write_csv,
                              write_json, write_validation_report)
from simulator.search import LayoutSpace, ModelSpace, require_feasible, search_layouts, search_models

GB = 2**30
COARSE_SPACE = {"vpp": [1, 2], "cp": [1], "zero1": [True], "optimizer_offload": [False], "micro_batch_size": [1],
                "recompute": ["selective", "full"], "swap": [False, True], "dispatcher": ["alltoall", "hierarchical"]}


def _recipe(args) -> tuple[SimRecipe, dict]:
    """The simulation recipe from --recipe and/or --model/--hardware/--devices, plus --set overrides.
    Returns it with the raw mapping (search reads its optional layout_space/model_space sections)."""
    data: dict = {}
    base = Path.cwd()
    if args.recipe:
        data = load_yaml(args.recipe)
        base = Path(args.recipe).parent
    if args.model:
        data["model"] = args.model
    if args.hardware:
        data["hardware"] = args.hardware
    if args.devices is not None:
        data["num_devices"] = args.devices
    apply_overrides(data, parse_overrides(args.set, "--set"), args.recipe or "the command line")
    extra = {k: data.pop(k) for k in ("layout_space", "model_space") if k in data}
    return sim_recipe_from_dict(data, base, "the command line (give --model/--hardware/--devices or a --recipe)"), extra


def _simulator(r: SimRecipe) -> Simulator:
    return Simulator(r.model, load_hardware(r.hardware), r.num_devices, r.options)


def cmd_estimate(args) -> int:
    r, _ = _recipe(args)
    sim = _simulator(r)
    if sim.hw.device == "cpu":  # a CPU profile describes one machine at one speed: is it this one?
        warning = profile_mismatch(sim.hw, quick_probe(sim.hw.cpu_threads))
        if warning:
            print(warning, file=sys.stderr)
    t0 = time.perf_counter()
    est = sim.estimate(r.layout)
    dt = time.perf_counter() - t0
    name = Path(args.model or (args.recipe or "")).stem or "model"
    print(f"model: {model_line(r.model)}")
    print(describe(est, name, r.num_devices, sim.hw.usable_memory_bytes / GB))
    print(f"\n(estimated in {dt * 1e3:.0f} ms, event-level timeline of {len(est.timeline.events)} events)")
    if args.trace:
        print(f"timeline: {est.timeline.to_chrome_trace(args.trace)} (open in https://ui.perfetto.dev)")
    if args.json:
        print(f"json: {write_json(estimate_dict(est), args.json)}")
    if args.load_trace:
        from simulator.load_trace import compare_placement, read_load_trace
        print(compare_placement(sim, r.layout, read_load_trace(args.load_trace)).describe())
    return 0


def cmd_search(args) -> int:
    r, extra = _recipe(args)
    hw = load_hardware(r.hardware)
    lspace = from_dict(LayoutSpace, {"global_batch_size": r.layout.global_batch_size, "seq_len": r.layout.seq_len,
                                     **extra.get("layout_space", {})}, "layout_space")
    out = Path(args.out)
    if args.models:
        mspace = from_dict(ModelSpace, extra.get("model_space", {}), "model_space")
        if "layout_space" not in extra:  # one layout search per model shape: a coarser default space
            lspace = from_dict(LayoutSpace, {"global_batch_size": r.layout.global_batch_size, "seq_len": r.layout.seq_len,
                                             **COARSE_SPACE}, "layout_space")
        rows = search_models(r.model, hw, r.num_devices, mspace, lspace, r.options, progress=not args.no_progress)
        cols = ["hidden_size", "num_layers", "num_experts", "top_k", "expert_ffn_size", "num_shared_experts",
                "total_params_b", "activated_params_b", "best_layout", "step_time_s", "tokens_per_s", "mfu",
                "peak_memory_gb"]
        print(table(rows, cols, args.top))
        print(f"\n{len(rows)} model shapes within budget; csv: {write_csv(rows, out / 'models.csv')}")
        write_json(rows, out / "models.json")
        return 0
    sim = Simulator(r.model, hw, r.num_devices, r.options)
    cpu0 = time.process_time()
    res = search_layouts(sim, lspace, rerank=args.rerank, progress=not args.no_progress,
                         pessimistic=args.rank_by == "pessimistic")
    cpu = time.process_time() - cpu0
    require_feasible(res, f"this model on {r.num_devices} x {hw.name}")
    best = [{**b.summary(), **{k: round(v, 3) for k, v in b.breakdown.items() if k != "total"}} for b in res.best]
    print(table(best, ["layout", "dp", "micro_batches", "step_time_s", "tokens_per_s", "mfu", "peak_memory_gb",
                       "compute", "ep_comm", "tp_comm", "bubble", "dp_comm"], args.top))
    print(f"\nspace {lspace.size():,} points; {res.evaluated:,} layouts costed ({res.feasible:,} fit) in "
          f"{res.seconds:.1f} s wall / {cpu:.1f} s CPU: {res.rate:,.0f} layouts/s "
          f"({res.evaluated / max(cpu, 1e-9):,.0f}/s per CPU second); best {len(res.best)} re-ranked on the timeline")
    write_csv(res.rows, out / "layouts.csv")
    write_json({"best": [estimate_dict(b) for b in res.best], "pareto": pareto_front(res.rows),
                "evaluated": res.evaluated, "feasible": res.feasible, "seconds": res.seconds}, out / "search.json")
    pareto_plot(res.rows, out / "pareto.png", hw.usable_memory_bytes / GB,
                f"{Path(args.model or args.recipe).stem}: {res.evaluated:,} layouts on {r.num_devices} x {hw.name}")
    res.best[0].timeline.to_chrome_trace(out / "best_timeline.json")
    print(f"wrote {out}/layouts.csv, search.json, pareto.png, best_timeline.json")
    return 0


def cmd_calibrate(args) -> int:
    from simulator.calibrate import DEFAULT_OUT, calibrate
    calibrate(args.out or DEFAULT_OUT, quick=args.quick, collectives=not args.no_collectives, threads=args.threads)
    return 0


def cmd_validate(args) -> int:
    from simulator.calibrate import calibrate
    from simulator.bands import BAND_RUNS, record_bands
    from simulator.validate import DEFAULT_CONFIG, run_validation, summarize
    hw = args.hardware
    if args.calibrate or not Path(hw).is_file():
        print(f"calibrating first ({hw})")
        calibrate(hw, threads=args.threads)
    if args.models:
        return _validate_models(hw, args)
    mem_ok = _validate_memory(hw, args)
    if args.memory:
        return 0 if mem_ok else 1
    rows = run_validation(hw, args.config or DEFAULT_CONFIG, workdir=Path(args.workdir) if args.workdir else None,
                          only=args.case)
    print()
    print(table(rows, ["case", "world", "tp", "ep", "dispatcher", "micro_batch_size", "grad_accum", "seq_len",
                       "ep_imbalance", "machine_slowdown", "predicted_s", "measured_s", "error_pct",
                       "calibration_only_s", "calibration_only_error_pct", "fastest_s", "wall_s",
                       "band_low_s", "band_high_s", "in_band", "predicted_bubble", "measured_bubble",
                       "bubble_error_pts",
                       "predicted_act_mb", "measured_act_mb", "act_error_pct", "note"]))
    s = summarize(rows)
    print(f"\n{s['measured']} of {s['cases']} cases measured: median |error| {s['median_abs_error_pct']:.1f}%, "
          f"worst {s['max_abs_error_pct']:.1f}% (target <= 15% / <= 30%: {'PASS' if s['pass'] else 'FAIL'}); "
          f"from the calibration alone, without the speed probe: median {s['calibration_only_median_abs_error_pct']:.1f}%, "
          f"worst {s['calibration_only_max_abs_error_pct']:.1f}%; "
          f"activation memory median |error| "
          + (f"{s['median_abs_act_error_pct']:.1f}%" if s["median_abs_act_error_pct"] is not None else "n/a"))
    if s["with_band"]:
        print(f"{s['in_band']} of {s['with_band']} measured step times inside the error band from the "
              f"profile's previous validations (up to {BAND_RUNS})")
    if not args.case and Path(hw).is_file():  # a partial run would narrow the bands to its cases
        bands = record_bands(hw, rows)
        if bands:
            print(f"error bands recorded in {hw}: all cases {bands['all'][0]:+.1f}% to {bands['all'][1]:+.1f}%, "
                  f"{len(bands) - 1} features")
    if args.out:
        print("report: " + ", ".join(str(x) for x in write_validation_report(rows, s, str(hw), args.out)))
    return 0 if s["pass"] and mem_ok else 1


def _validate_memory(hw, args) -> bool:
    """The memory cases (simulator/validate_memory.py): predicted vs measured bytes, 10 % target."""
    from simulator.validate import DEFAULT_CONFIG
    from simulator.validate_memory import MEMORY_COLUMNS, TARGET_PCT, run_memory_validation, summarize_memory
    rows = run_memory_validation(hw, args.config or DEFAULT_CONFIG, Path(args.workdir) if args.workdir else None,
                                 args.case)
    if not rows:
        return True
    print()
    print(table(rows, MEMORY_COLUMNS))
    s = summarize_memory(rows)
    worst = s["memory_max_abs_error_pct"]
    print(f"\nmemory: {s['memory_measured']} of {s['memory_cases']} cases measured, worst |error| "
          + (f"{worst:.1f}%" if worst is not None else "n/a")
          + f" (target <= {TARGET_PCT:.0f}% for every quantity: {'PASS' if s['memory_pass'] else 'FAIL'})\n")
    if args.out:
        out = Path(args.out)
        path = (out.parent if out.suffix == ".json" else out) / "validation_memory.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": s, "cases": rows}, indent=1, default=str))
        print(f"memory report: {path}")
    return s["memory_pass"]


def _validate_models(hw, args) -> int:
    """`validate --models`: the model search checked by training (simulator/validate_models.py)."""
    from simulator.validate_models import DEFAULT_MODELS_CONFIG, run_model_check
    rows, s = run_model_check(hw, args.config or DEFAULT_MODELS_CONFIG,
                              workdir=Path(args.workdir) if args.workdir else None)
    print()
    print(table(rows, ["model", "total_params_m", "activated_params_m", "predicted_rank", "predicted_tokens_per_s",
                       "measured_tokens_per_s", "calibration_only_tokens_per_s", "machine_slowdown", "note"]))
    if s["rank_correlation"] is None:
        print(f"\nonly {s['trained']} candidates trained: no ranking to compare")
    else:
        print(f"\n{s['trained']} candidates trained: rank correlation predicted vs measured tokens/s "
              f"{s['rank_correlation']:.2f} (calibration alone {s['calibration_only_rank_correlation']:.2f}); "
              f"predicted best {s['predicted_best']} is {s['best_shortfall_pct']:.1f}% below the measured best "
              f"{s['measured_best']} (target >= 6 trained, >= 0.9, <= 5%: {'PASS' if s['pass'] else 'FAIL'})")
    if args.out:
        print(f"report: {write_json({'rows': rows, 'summary': s, 'hardware': str(hw)}, Path(args.out) / 'models.json')}")
    return 0 if s["pass"] else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m simulator",
                                 description="Predict MoE training step time, MFU and memory; search layouts.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def recipe_args(p):
        p.add_argument("--recipe", help="simulation recipe YAML (model, hardware, num_devices, layout, options)")
        p.add_argument("--model", help="model YAML (overrides the recipe's)")
        p.add_argument("--hardware", help="hardware profile name or YAML path (overrides the recipe's)")
        p.add_argument("--devices", type=int, help="number of devices (overrides the recipe's)")
        p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                       help="overrides, e.g. layout.tp=4 options.expert_imbalance=1.2")

    p = sub.add_parser("estimate", help="one configuration: step time breakdown, MFU, memory")
    recipe_args(p)
    p.add_argument("--trace", help="write the pipeline timeline as Chrome-trace JSON")
    p.add_argument("--json", help="write the estimate as JSON")
    p.add_argument("--load-trace", help="a run's metrics.jsonl with placement metrics: estimate the layout at its "
                                        "measured expert imbalance without and with dynamic placement")
    p.set_defaults(fn=cmd_estimate)

    p = sub.add_parser("search", help="search parallel layouts (or model shapes with --models)")
    recipe_args(p)
    p.add_argument("--models", action="store_true", help="search model hyperparameters within budgets")
    p.add_argument("--out", default="runs/search", help="output directory (csv, json, pareto.png, timeline)")
    p.add_argument("--top", type=int, default=15, help="rows to print")
    p.add_argument("--rerank", type=int, default=20, help="best layouts re-costed on the event timeline")
    p.add_argument("--rank-by", choices=("predicted", "pessimistic"), default="predicted",
                   help="rank by the predicted step time or by the slow end of its error band")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("calibrate", help="microbenchmark this machine and write a hardware profile")
    p.add_argument("--out", help="profile path (default configs/hardware/cpu_calibrated.yaml)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes")
    p.add_argument("--no-collectives", action="store_true", help="skip the gloo collective benchmarks")
    p.add_argument("--threads", type=int, default=1, help="torch threads to measure with (default 1)")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("validate", help="run the trainer under several layouts; compare with predictions")
    p.add_argument("--hardware", default="configs/hardware/cpu_calibrated.yaml", help="calibrated CPU profile")
    p.add_argument("--calibrate", action="store_true", help="calibrate first (also when the profile is missing)")
    p.add_argument("--threads", type=int, default=1, help="torch threads when calibrating")
    p.add_argument("--config", help="validation cases YAML (default configs/simulator/validate_cpu.yaml)")
    p.add_argument("--case", nargs="*", help="run only these cases")
    p.add_argument("--models", action="store_true",
                   help="check the model search instead: train its predicted best and worst shapes "
                        "(--config default configs/simulator/validate_models_cpu.yaml)")
    p.add_argument("--memory", action="store_true",
                   help="run only the memory cases: predicted vs measured activation, swap and optimizer bytes")
    p.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    p.add_argument("--out", help="report directory: validation.json, .md (a table per case) and .png "
                                 "(predicted vs measured); or a .json path, the others beside it")
    p.set_defaults(fn=cmd_validate)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CalibrationError as e:
        print(f"error: {e}; the profile was not written", file=sys.stderr)
        return 1
