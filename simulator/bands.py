"""Error bands: how far a prediction may be off, from the validation residuals of the profile.

`simulate validate` compares predicted and measured step times over its cases and records, per
feature a case exercises (`features`: tp, ep, dp, tp_extend_ep, a dispatcher, pp, vpp, ...), the
lowest and highest signed error (predicted - measured) / measured, in percent, over its cases and
those of the `BAND_RUNS - 1` validations before it, in the profile (`HardwareProfile.error_bands`,
"all" for every case; each run's own ranges are kept in `error_bands_history` for the next runs to
join). Several runs, not one: on this shared host a whole run's errors shift together with the
host's state (every case +5 to +9 % in one run), so one run's extremes covered the next run's
errors in 6 to 17 of 17 cases, the last two runs' in 12 to 17, the last three runs' in 16 and 17.
An estimate of a layout gets the band of the features it uses: the widest low and high ends among them and "all". If the error of a case
lay in [lo, hi], its measured time lay in [predicted / (1 + hi), predicted / (1 + lo)]: that is the
interval reported for the true step time. Features the validation never ran (cp on CPU today) are
named as unvalidated beside the band: the band does not cover them.

The band is in-sample for the validation that produced it; it is a statement about the cost model
on this profile's cases, not a confidence interval. Quoted accelerator profiles have no band.
"""
from __future__ import annotations

from typing import Optional

from parallel.config import DEFAULT_RANK_ORDER
from parallel.layout import order_changes_groups

# Features the validation can exercise; a layout feature outside this list is never in a band.
KNOWN = ("tp", "ep", "dp", "tp_extend_ep", "pp", "vpp", "cp", "alltoall", "allgather", "hierarchical",
         "zero1", "recompute", "swap", "optimizer_offload", "rank_order")


def layout_features(tp: int = 1, ep: int = 1, dp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1,
                    tp_extend_ep: bool = False, dispatcher: str = "local", zero1: bool = False,
                    recompute: str = "none", swap: bool = False, optimizer_offload: bool = False,
                    rank_order: str = DEFAULT_RANK_ORDER) -> set[str]:
    """What a layout exercises beyond one process running the whole model ("rank_order": another
    order than Megatron's where it changes the groups)."""
    out = {name for name, n in (("tp", tp), ("ep", ep), ("dp", dp), ("pp", pp), ("vpp", vpp), ("cp", cp)) if n > 1}
    if tp_extend_ep and tp > 1:
        out.add("tp_extend_ep")
    if ep > 1 or (tp_extend_ep and tp > 1):
        out.add(dispatcher)
    if zero1 and dp > 1:
        out.add("zero1")
    if recompute != "none":
        out.add("recompute")
    out |= {name for name, on in (("swap", swap), ("optimizer_offload", optimizer_offload)) if on}
    if order_changes_groups(tp, cp, dp, rank_order):
        out.add("rank_order")
    return out


def residual_bands(rows: list[dict]) -> dict[str, list[float]]:
    """feature -> [lowest, highest] signed error in percent over the measured validation rows
    (each with `error_pct` and `features`); "all" over every row."""
    bands: dict[str, list[float]] = {}
    for r in rows:
        e = r.get("error_pct")
        if e is None:
            continue
        for f in ["all", *r.get("features", [])]:
            lo, hi = bands.get(f, [e, e])
            bands[f] = [min(lo, e), max(hi, e)]
    return bands


def band_for(features: set[str], bands: dict[str, list[float]]) -> Optional[tuple[float, float, list[str]]]:
    """(lowest, highest) signed error in percent for a layout with `features`, and the features no
    validation case ran; None without bands."""
    if not bands or "all" not in bands:
        return None
    ends = [bands["all"]] + [bands[f] for f in features if f in bands]
    return min(b[0] for b in ends), max(b[1] for b in ends), sorted(f for f in features if f not in bands)


def step_time_interval(predicted_s: float, lo_pct: float, hi_pct: float) -> tuple[float, float]:
    """Where the true step time lies if the prediction's error is within [lo, hi] percent."""
    return predicted_s / (1 + hi_pct / 100), predicted_s / (1 + max(lo_pct, -99.0) / 100)


def join_bands(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per feature, the range covering both."""
    out = {k: list(v) for k, v in a.items()}
    for k, (lo, hi) in b.items():
        out[k] = [min(lo, out[k][0]), max(hi, out[k][1])] if k in out else [lo, hi]
    return out


BAND_RUNS = 3  # validations a profile's bands join: this one and the two before it
_BAND_KEYS = ("error_bands:", "error_band_cases:", "error_bands_history:", "error_band_cases_history:")


def record_bands(profile_path, rows: list[dict]) -> Optional[dict[str, list[float]]]:
    """Write the residual bands of `rows`, joined with those of the `BAND_RUNS - 1` validations
    before it, into the profile file (its other lines, comments included, unchanged; written whole,
    then renamed). Returns the joined bands; None when no row was measured."""
    import os
    from pathlib import Path

    import yaml

    from simulator.hardware import load_hardware
    own = residual_bands(rows)
    if not own:
        return None
    p = Path(profile_path)
    previous = load_hardware(p)  # typed and checked: a hand-edited history fails here, in one line
    keep = []
    skipping = False
    for line in p.read_text().splitlines():
        if line.startswith(_BAND_KEYS):
            skipping = line.rstrip().endswith(":")  # a block value follows
            continue
        if skipping and line.startswith((" ", "-")):
            continue
        skipping = False
        keep.append(line)

    def rounded(bands):
        return {k: [round(v[0], 2), round(v[1], 2)] for k, v in sorted(bands.items())}
    measured = sum(1 for r in rows if r.get("error_pct") is not None)
    history = [*previous.error_bands_history, rounded(own)][-BAND_RUNS:]
    cases = [*previous.error_band_cases_history, measured][-BAND_RUNS:]
    joined: dict[str, list[float]] = {}
    for b in history:
        joined = join_bands(joined, b)
    joined = rounded(joined)
    text = "\n".join(keep) + "\n" + yaml.safe_dump(
        {"error_bands": joined, "error_band_cases": sum(cases),
         "error_bands_history": history, "error_band_cases_history": cases},
        sort_keys=False, default_flow_style=None)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)
    return joined
