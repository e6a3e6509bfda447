"""Reports: text tables for the terminal, CSV/JSON files, and the Pareto plot (throughput vs memory)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Optional

from moe import accounting as acc
from moe.mfu_conventions import DESCRIPTIONS
from simulator.estimate import Estimate

GB = 2**30


def table(rows: list[dict], columns: list[str], limit: Optional[int] = None) -> str:
    rows = rows[:limit] if limit else rows

    def fmt(v) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(cell, widths)) for cell in cells]
    return "\n".join(out)


def describe(est: Estimate, model_name: str = "", num_devices: int = 0, usable_gb: float = 0.0) -> str:
    """Human-readable estimate: headline, step-time breakdown, memory, heaviest operators."""
    d, lay = est.derived, est.layout
    lines = [f"{model_name} on {num_devices} x {est.hardware}: layout {lay.short()} "
             f"(dp {d.dp}, ep {d.ep}, etp {d.etp}, edp {d.edp}, {d.micro_batches} micro-batches/pipeline, "
             f"{d.noop_layers} no-op layers)",
             f"step {est.step_time:.3f} s | {est.tokens_per_s:,.0f} tokens/s | MFU {100 * est.mfu:.1f}% (ultramoe convention) | "
             f"peak memory {est.peak_memory / GB:.1f} GiB of {usable_gb:.1f} usable -> "
             f"{'fits' if est.fits else 'OUT OF MEMORY'}", band_line(est), *mfu_lines(est), "",
             f"step-time breakdown (busiest pipeline stage, rank {est.critical_stage} of {lay.pp}):"]
    total = est.breakdown.get("total", est.step_time) or 1.0
    for k, v in est.breakdown.items():
        if k != "total":
            lines.append(f"  {k:<12} {v:9.3f} s  {100 * v / total:5.1f}%")
    if len(est.stage_busy) > 1:
        lines.append("  busy s per pipeline stage: " + " ".join(f"{x:.2f}" for x in est.stage_busy))
    lines += ["", "memory on the fullest device:"]
    for k, v in est.memory.items():
        lines.append(f"  {k:<14} {v / GB:7.2f} GiB")
    if est.stage_memory:
        lines.append("  per pipeline rank: " + " ".join(f"{x / GB:.1f}" for x in est.stage_memory))
    if est.ops:
        lines += ["", "heaviest operators (forward + backward per step, busiest stage):"]
        for name, t in list(est.ops.items())[:10]:
            lines.append(f"  {name:<16} {t:9.3f} s")
    return "\n".join(lines)


def band_line(est: Estimate) -> str:
    """The interval the true step time lies in, from the profile's validation residuals."""
    if est.step_time_band is None:
        return f"error band: none (profile {est.hardware!r} has no validation residuals: `simulate validate` records them)"
    lo, hi = est.step_time_band
    out = (f"error band: true step time {lo:.4g}-{hi:.4g} s (predictions of this kind were "
           f"{est.error_band_pct[0]:+.1f}% to {est.error_band_pct[1]:+.1f}% off in the profile's validation)")
    if est.unvalidated:
        out += f"; not covered by any validation case: {', '.join(est.unvalidated)}"
    return out


def mfu_lines(est: Estimate) -> list[str]:
    """MFU under each published FLOP convention, named, with tokens/s per device beside it: the
    figures to compare with a paper's (see moe/mfu_conventions.py for what each counts)."""
    if not est.mfu_by_convention:
        return []
    out = [f"MFU by FLOP convention ({est.tokens_per_s_per_device:,.1f} tokens/s per device, peak "
           f"{est.peak_flops_per_s / 1e12:,.4g} TFLOP/s per device):"]
    for c, v in est.mfu_by_convention.items():
        out.append(f"  {c:<18} {100 * v:5.1f}%   {DESCRIPTIONS[c]}")
    return out


def estimate_dict(est: Estimate) -> dict:
    from dataclasses import asdict
    return {**est.summary(), "layout_fields": asdict(est.layout), "derived": asdict(est.derived),
            "breakdown_s": est.breakdown, "memory_gb": {k: v / GB for k, v in est.memory.items()},
            "stage_memory_gb": [x / GB for x in est.stage_memory], "ops_s": est.ops,
            "critical_stage": est.critical_stage, "stage_busy_s": est.stage_busy,
            "error_band_pct": est.error_band_pct, "step_time_band_s": est.step_time_band,
            "unvalidated": est.unvalidated,
            "mfu_by_convention": est.mfu_by_convention, "mfu_peak_flops_per_s": est.peak_flops_per_s,
            "model_flops_per_token": est.model_flops_per_token}


def write_csv(rows: list[dict], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        p.write_text("")
        return p
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return p


def write_json(obj, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=float))
    return p


def pareto_front(rows: Iterable[dict]) -> list[dict]:
    """Feasible layouts no other beats on both throughput and peak memory."""
    pts = sorted((r for r in rows if r["fits"]), key=lambda r: (r["peak_memory_gb"], -r["tokens_per_s"]))
    front, best = [], -1.0
    for r in pts:
        if r["tokens_per_s"] > best:
            front.append(r)
            best = r["tokens_per_s"]
    return front


def pareto_plot(rows: list[dict], path: str | Path, memory_limit_gb: float, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    ok = [r for r in rows if r["fits"]]
    bad = [r for r in rows if not r["fits"] and r["peak_memory_gb"] < 4 * memory_limit_gb]
    if bad:
        ax.scatter([r["peak_memory_gb"] for r in bad], [r["tokens_per_s"] for r in bad], s=3, c="0.8",
                   label="out of memory")
    ax.scatter([r["peak_memory_gb"] for r in ok], [r["tokens_per_s"] for r in ok], s=4, c="tab:blue",
               alpha=0.4, label="fits")
    front = pareto_front(rows)
    ax.plot([r["peak_memory_gb"] for r in front], [r["tokens_per_s"] for r in front], "o-", c="tab:red",
            ms=4, label="Pareto front")
    ax.axvline(memory_limit_gb, ls="--", c="k", lw=1, label=f"usable memory {memory_limit_gb:.0f} GiB")
    ax.set_xlabel("peak memory per device (GiB)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def model_line(cfg) -> str:
    pc = acc.param_counts(cfg)
    return f"{acc.format_params(pc.total)} total / {acc.format_params(pc.activated)} activated parameters"


def _layout_of_row(r: dict) -> str:
    parts = [f"world {r['world']}"]
    parts += [f"{k} {r[k]}" for k in ("tp", "ep", "pp", "vpp") if (r.get(k) or 1) > 1]
    if r.get("ep", 1) > 1:
        parts.append(r["dispatcher"])
    parts.append(f"{r['micro_batch_size']}x{r['seq_len']} tokens" + (f" x{r['grad_accum']}" if r["grad_accum"] > 1 else ""))
    return ", ".join(parts)


def validation_markdown(rows: list[dict], summary: dict, hardware: str) -> str:
    """The validation as a cluster owner reads it: one row per case (layout, predicted, measured,
    error, the band from the profile's previous validation), then the summary."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    out = [f"# Simulator validation on {hardware}", "",
           "| case | layout | features | predicted s | measured s | error | calibration alone | band s | in band "
           "| bubble predicted / measured |",
           "|---|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        band = (f"{r['band_low_s']:.4f}-{r['band_high_s']:.4f}" if r.get("band_low_s") is not None else "none")
        inside = {True: "yes", False: "**no**", None: "-"}[r.get("in_band")]
        bubble = (f"{100 * r['predicted_bubble']:.1f}% / {100 * r['measured_bubble']:.1f}%"
                  if r.get("measured_bubble") is not None else "-")
        out.append(f"| {r['case']} | {_layout_of_row(r)} | {', '.join(r.get('features', [])) or '-'} | "
                   f"{num(r['predicted_s'], '.4f')} | {num(r['measured_s'], '.4f')} | {num(r['error_pct'], '+.1f')}% | "
                   f"{num(r['calibration_only_error_pct'], '+.1f')}% | {band} | {inside} | {bubble} |"
                   + (f" {r['note']}" if r.get("note") else ""))
    s = summary
    out += ["", f"{s['measured']} of {s['cases']} cases measured: median |error| "
            f"{num(s['median_abs_error_pct'], '.1f')}%, worst {num(s['max_abs_error_pct'], '.1f')}% "
            f"(target 15 % / 30 %: {'PASS' if s['pass'] else 'FAIL'}); calibration alone median "
            f"{num(s['calibration_only_median_abs_error_pct'], '.1f')}%, worst "
            f"{num(s['calibration_only_max_abs_error_pct'], '.1f')}%."]
    if s.get("with_band"):
        out.append(f"{s['in_band']} of {s['with_band']} measured step times inside the previous validation's band.")
    return "\n".join(out) + "\n"


def validation_plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Predicted vs measured step time, one point per measured case, the diagonal and +-15 %."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if r.get("measured_s")]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6))
    if pts:
        lo = min(min(r["measured_s"], r["predicted_s"]) for r in pts) * 0.8
        hi = max(max(r["measured_s"], r["predicted_s"]) for r in pts) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="exact")
        ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="0.9", label="+-15 %")
        for r in pts:
            if r.get("band_low_s") is not None:
                ax.plot([r["measured_s"]] * 2, [r["band_low_s"], r["band_high_s"]], c="tab:orange", lw=2, alpha=0.5)
        ax.scatter([r["measured_s"] for r in pts], [r["predicted_s"] for r in pts], c="tab:blue", zorder=3,
                   label="cases")
        for r in pts:
            ax.annotate(r["case"], (r["measured_s"], r["predicted_s"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title or "simulate validate: predicted vs measured")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def write_validation_report(rows: list[dict], summary: dict, hardware: str, out: str | Path) -> list[Path]:
    """`validate --out`: DIR/validation.{json,md,png}; a path ending in .json names the JSON file
    and puts the other two beside it with the same stem."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix == ".json" else out / "validation"
    paths = [write_json({"rows": rows, "summary": summary, "hardware": hardware}, base.with_suffix(".json"))]
    md = base.with_suffix(".md")
    md.write_text(validation_markdown(rows, summary, hardware))
    paths += [md, validation_plot(rows, base.with_suffix(".png"), f"simulate validate on {hardware}")]
    return paths
