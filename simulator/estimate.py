"""What the cost model produces: the `Estimate` of one layout (step time, MFU, memory, breakdown,
error band) and the per-rank-group sums (`PipeSums`) it schedules a layout from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from simulator.layout import Derived, Layout
from simulator.schedule import Timeline

GB = 2**30


@dataclass
class Estimate:
    layout: Layout
    derived: Derived
    step_time: float
    tokens_per_s: float
    mfu: float
    breakdown: dict  # seconds on the busiest pipeline rank (critical_stage); sums to step_time
    memory: dict  # bytes on the device with the highest peak
    peak_memory: float
    fits: bool
    hardware: str
    model_flops_per_token: float
    stage_memory: list = field(default_factory=list)  # peak bytes per pipeline rank
    stage_activations: list = field(default_factory=list)  # saved-activation bytes at peak per pipeline rank
    ops: dict = field(default_factory=dict)  # per-step seconds by operator on the busiest stage
    timeline: Optional[Timeline] = None
    # MFU under each published FLOP convention (moe/mfu_conventions.py); `mfu` is "ultramoe"'s
    mfu_by_convention: dict = field(default_factory=dict)
    tokens_per_s_per_device: float = 0.0
    peak_flops_per_s: float = 0.0  # the MFU denominator of one device
    critical_stage: int = 0  # the pipeline rank `breakdown` and `ops` describe: the busiest one
    stage_busy: list = field(default_factory=list)  # forward + backward + exposed comm s per pipeline rank
    # from the profile's validation residuals (simulator/bands.py); None: the profile has none
    error_band_pct: Optional[tuple] = None  # (lowest, highest) signed error of such predictions
    step_time_band: Optional[tuple] = None  # (low, high) seconds the true step time lies in
    unvalidated: list = field(default_factory=list)  # features of this layout no validation case ran

    @property
    def pessimistic_step_time(self) -> float:
        return self.step_time_band[1] if self.step_time_band else self.step_time

    def summary(self) -> dict:
        return {"layout": self.layout.short(), "dp": self.derived.dp, "micro_batches": self.derived.micro_batches,
                "step_time_s": self.step_time, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_per_device": self.tokens_per_s_per_device, "mfu": self.mfu,
                **{f"mfu_{c}": v for c, v in self.mfu_by_convention.items() if c != "ultramoe"},
                "peak_memory_gb": self.peak_memory / GB, "fits": self.fits}


@dataclass
class PipeSums:
    """Per-rank-group sums (index g = group[rank]); ranks of a group hold equal chunk compositions."""

    lkey: tuple  # the layout fields the layer costs depend on
    group: list  # rank -> group
    reps: list  # lowest rank of each group
    sizes: list  # ranks per group
    f_st: list  # forward of one micro-batch through all the rank's chunks, steady phase
    b_st: list
    f_w: list  # warm-up / cool-down phase
    b_w: list
    act: list  # per chunk: kept activation bytes of one micro-batch
    act_full: list  # largest chunk's activations without recompute
    swapped: list  # largest chunk's swapped bytes
    params: list  # (dense, expert) parameters
    tensors: list  # parameter tensors
    w_st_max: float  # largest steady-phase work per micro-batch over the ranks
    w_w_max: float  # largest warm-up-phase work per micro-batch
    w_w_total: float  # warm-up-phase work summed over all ranks
    extras: dict = field(default_factory=dict)  # Simulator._group_extras cache
