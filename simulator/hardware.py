"""Hardware profiles: what one device and its links can do, loaded from configs/hardware/*.yaml.

A profile gives peak FLOP/s by dtype, an achievable-efficiency curve for matmuls as a function of the
GEMM shape, memory capacity and bandwidth, the bandwidth and latency of the intra-node (fast domain:
HCCS, NVLink, Ascend UB) and inter-node (RoCE, InfiniBand) links, and the host link used for
swapping and optimizer offload. Calibrated profiles (`python -m simulator calibrate`) have the same
shape, so every cost formula reads measured and quoted hardware alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from config import ConfigError, from_dict, load_yaml, require, resolve_file
from parallel.peaks import QUOTED_PEAKS_TFLOPS

HARDWARE_DIR = Path(__file__).resolve().parents[1] / "configs" / "hardware"

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


class CalibrationError(RuntimeError):
    """`calibrate` could not take or fit a measurement; no profile was written."""


@dataclass
class MatmulEfficiency:
    """Achievable fraction of peak for an (m x k) @ (k x n) GEMM.

    eff = peak_fraction * g(m) * g(k) * g(n), with g(x) = x / (x + half_dim): large GEMMs approach
    `peak_fraction`; a dimension equal to `half_dim` halves the rate (tiling and pipeline fill). One
    saturating factor per dimension captures why small per-expert token counts (m) and narrow experts
    (n) run slower, with two numbers that calibration can fit.
    """

    peak_fraction: float = 0.75
    half_dim: float = 64.0
    attention_factor: float = 0.8  # core attention's rate relative to a GEMM of its shape

    def __call__(self, m: float, k: float, n: float) -> float:
        h = self.half_dim
        return self.peak_fraction * (m / (m + h)) * (k / (k + h)) * (n / (n + h))

    def validate(self, path: str = "") -> None:
        require(0 < self.peak_fraction <= 1, f"{path}.peak_fraction", f"must be in (0, 1], got {self.peak_fraction}")
        require(0 < self.attention_factor <= 2, f"{path}.attention_factor",
                f"must be in (0, 2], got {self.attention_factor}")
        require(self.half_dim >= 0, f"{path}.half_dim", f"must be >= 0, got {self.half_dim}")


@dataclass
class Link:
    """A collective link: achievable bandwidth per device (GB/s, one direction) and per-step latency."""

    bandwidth_gbps: float
    latency_us: float = 10.0

    @property
    def bw(self) -> float:  # bytes/s
        return self.bandwidth_gbps * 1e9

    @property
    def lat(self) -> float:  # seconds
        return self.latency_us * 1e-6

    def validate(self, path: str = "") -> None:
        require(self.bandwidth_gbps > 0, f"{path}.bandwidth_gbps", f"must be positive, got {self.bandwidth_gbps}")
        require(self.latency_us >= 0, f"{path}.latency_us", f"must be >= 0, got {self.latency_us}")


@dataclass
class HardwareProfile:
    name: str
    device: str  # npu | cuda | cpu
    memory_gb: float  # device memory capacity
    memory_bandwidth_gbps: float  # achievable device-memory bandwidth, GB/s
    devices_per_node: int  # size of the fast-link domain (a super-node's UB domain on A3)
    intra_node: Link
    inter_node: Link
    host_link: Link  # device <-> host (PCIe): activation swap, optimizer offload
    # dtype -> dense TFLOP/s of one device: measured (CPU profiles), or from the one table of quoted
    # peaks (`parallel/peaks.py`) by naming the device there with `quoted_peak` (`load_hardware`)
    peak_tflops: dict[str, float] = field(default_factory=dict)
    quoted_peak: str = ""  # the table's key the peaks came from; "" when measured or given
    matmul: MatmulEfficiency = field(default_factory=MatmulEfficiency)
    host_memory_bandwidth_gbps: float = 100.0  # host-side optimizer step runs at this rate
    op_overhead_us: float = 10.0  # fixed cost per launched operator (dispatch/launch latency)
    reserved_memory_gb: float = 2.0  # runtime, communication buffers, fragmentation
    cpu_threads: int = 0  # CPU profiles: torch threads the measurements used (0: not a CPU profile)
    # Fused kernels (flash attention, fused norms and activations); None: yes unless device is cpu,
    # whose reference path runs them as several small ops that launch and save more.
    fused_kernels: Optional[bool] = None
    # Calibrated element-wise operator costs, forward + backward: kind -> [fixed us, ns per element].
    # Kinds listed here replace the bytes-and-launches rule of `compute.py` for that kind.
    op_costs: dict[str, list[float]] = field(default_factory=dict)
    optimizer_cost: list[float] = field(default_factory=list)  # [us per tensor, ns per parameter]
    # Measured per collective kind (CPU profiles: gloo on this box, timed between bursts of compute
    # as in a training step): kind -> [bandwidth GB/s, latency us per step], used in place of
    # intra_node / inter_node for that kind (all_reduce, all_gather, reduce_scatter, all_to_all)
    collective_links: dict[str, list[float]] = field(default_factory=dict)
    # CPU profiles: how much slower one rank runs while N ranks share the machine:
    # N -> factor (the speed probe at N ranks over alone)
    concurrency_slowdown: dict[int, float] = field(default_factory=dict)
    # CPU profiles: seconds of the speed probe (`simulator/probe.py`) at calibration (0: none);
    # `validate` scales the compute-side rates by the probe's ratio to it during each case
    speed_probe: float = 0.0
    # CPU profiles: what isolated operator timings miss in a real forward + backward (Python and
    # autograd around the modules, the allocator under a step's live tensors), fitted on training
    # steps of the calibration's own model at several sizes: `work_correction` multiplies the
    # size-proportional costs (GEMM, memory, per-element), `overhead_correction` the fixed ones
    # (per-operator launch cost and the fixed part of `op_costs`). The simulator applies both.
    work_correction: float = 1.0
    overhead_correction: float = 1.0
    # CPU profiles: the machine the measurements were taken on (`simulator/machine.py`): cpu_model,
    # cpus, torch, threads; `estimate` and `validate` warn when this machine differs
    measured_on: dict[str, Union[str, int]] = field(default_factory=dict)
    # validation residuals (`simulator/bands.py`): feature -> [lowest, highest] signed step-time
    # error in percent over the cases of the last three `simulate validate` runs that used it; "all":
    # every case
    error_bands: dict[str, list[float]] = field(default_factory=dict)
    error_band_cases: int = 0  # how many measured cases the bands come from
    # the own residual ranges and case counts of the runs `error_bands` joins, oldest first
    error_bands_history: list[dict[str, list[float]]] = field(default_factory=list)
    error_band_cases_history: list[int] = field(default_factory=list)
    notes: str = ""

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        if self.device not in ("npu", "cuda", "cpu"):
            raise ConfigError(f"{p}device: must be npu, cuda or cpu, got {self.device!r}")
        if not self.peak_tflops:
            raise ConfigError(f"{p}peak_tflops: give at least one dtype, e.g. {{bf16: 256}}")
        for k, v in self.peak_tflops.items():
            if k not in DTYPE_BYTES:
                raise ConfigError(f"{p}peak_tflops.{k}: unknown dtype; use one of {', '.join(DTYPE_BYTES)}")
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{p}peak_tflops.{k}: must be a positive number, got {v!r}")
        for name in ("memory_gb", "memory_bandwidth_gbps", "host_memory_bandwidth_gbps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{p}{name}: must be positive, got {getattr(self, name)}")
        if self.devices_per_node < 1:
            raise ConfigError(f"{p}devices_per_node: must be >= 1, got {self.devices_per_node}")
        if self.op_overhead_us < 0 or self.reserved_memory_gb < 0:
            raise ConfigError(f"{p}op_overhead_us/reserved_memory_gb: must be >= 0")
        for k, v in self.op_costs.items():
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and x >= 0 for x in v)):
                raise ConfigError(f"{p}op_costs.{k}: expected [fixed_us, ns_per_element] (two numbers >= 0), got {v!r}")
        for k, v in self.collective_links.items():
            if k not in COLLECTIVE_KINDS:
                raise ConfigError(f"{p}collective_links.{k}: unknown collective; use one of {', '.join(COLLECTIVE_KINDS)}")
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
                    and v[0] > 0 and v[1] >= 0):
                raise ConfigError(f"{p}collective_links.{k}: expected [bandwidth_gbps > 0, latency_us >= 0], got {v!r}")
        if self.optimizer_cost and not (len(self.optimizer_cost) == 2 and min(self.optimizer_cost) >= 0):
            raise ConfigError(f"{p}optimizer_cost: expected [us_per_tensor, ns_per_parameter], got {self.optimizer_cost}")
        banded = [("error_bands", self.error_bands)]
        banded += [(f"error_bands_history[{i}]", b) for i, b in enumerate(self.error_bands_history)]
        for name, bands in banded:
            for k, v in bands.items():
                if not (len(v) == 2 and v[0] <= v[1] and v[0] > -100):
                    raise ConfigError(f"{p}{name}.{k}: expected [lowest, highest] percent with -100 < lowest "
                                      f"<= highest, got {v!r}; re-run `python -m simulator validate`")
        if len(self.error_band_cases_history) != len(self.error_bands_history):
            raise ConfigError(f"{p}error_band_cases_history: {len(self.error_band_cases_history)} entries for "
                              f"{len(self.error_bands_history)} in error_bands_history (one case count per "
                              f"validation); re-run `python -m simulator validate`")
        if self.speed_probe < 0:
            raise ConfigError(f"{p}speed_probe: must be >= 0, got {self.speed_probe}; "
                              f"re-run `python -m simulator calibrate`")
        for name in ("work_correction", "overhead_correction"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{p}{name}: must be > 0, got {getattr(self, name)}; "
                                  f"re-run `python -m simulator calibrate`")
        if self.reserved_memory_gb >= self.memory_gb:
            raise ConfigError(f"{p}reserved_memory_gb: {self.reserved_memory_gb} leaves no memory of "
                              f"memory_gb={self.memory_gb}")

    def scaled(self, work: float, fixed: float, optimizer: float = 1.0) -> "HardwareProfile":
        """The profile with its compute-side costs multiplied: the size-proportional ones (GEMM and
        memory rates, per-element operator costs) by `work`, the fixed ones (launch overhead, the
        fixed part of operator costs) by `fixed`, the calibrated optimizer step by `optimizer`.
        Links are left as they are."""
        return replace(self, peak_tflops={k: v / work for k, v in self.peak_tflops.items()},
                       memory_bandwidth_gbps=self.memory_bandwidth_gbps / work,
                       op_overhead_us=self.op_overhead_us * fixed,
                       op_costs={k: [a * fixed, b * work] for k, (a, b) in self.op_costs.items()},
                       optimizer_cost=[x * optimizer for x in self.optimizer_cost])

    def with_emulated_links(self, links) -> "HardwareProfile":
        """The profile as a run under `parallel.emulate_links` (`links`; None: unchanged) sees it: its
        two link classes replaced by the emulated ones and no per-collective measured links (the
        emulation charges every collective on those two classes, parallel/link_model.py)."""
        if links is None:
            return self
        return replace(self, intra_node=Link(links.intra_node.bandwidth_gbps, links.intra_node.latency_us),
                       inter_node=Link(links.inter_node.bandwidth_gbps, links.inter_node.latency_us),
                       collective_links={})

    def corrected(self) -> "HardwareProfile":
        """The forward/backward compute rates with the profile's corrections folded in (and reset
        to 1). The optimizer's calibrated cost is a measured step of its own and stays."""
        return replace(self.scaled(self.work_correction, self.overhead_correction),
                       work_correction=1.0, overhead_correction=1.0)

    @property
    def fused(self) -> bool:
        return self.device != "cpu" if self.fused_kernels is None else self.fused_kernels

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise ConfigError(f"options.dtype: profile {self.name!r} has no peak for {dtype!r}; "
                              f"it lists {', '.join(self.peak_tflops)}")
        return float(self.peak_tflops[dtype]) * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 2**30

    @property
    def usable_memory_bytes(self) -> float:
        return (self.memory_gb - self.reserved_memory_gb) * 2**30


def available_profiles() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def resolve_hardware(value, base: Path):
    """A recipe's `hardware:` entry: a profile name stays a name; a YAML path is looked up relative
    to the recipe's folder `base` first, then the working directory."""
    if isinstance(value, str) and value.endswith(".yaml"):
        found = resolve_file(value, base)
        return str(found) if found is not None else value
    return value


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """Load a profile by name (a file in configs/hardware/) or by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = HARDWARE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise ConfigError(f"hardware: unknown profile {str(name_or_path)!r}; available: "
                          f"{', '.join(available_profiles()) or '(none)'}, or give a path to a YAML file "
                          f"(`python -m simulator calibrate` writes one for this machine)")
    data = load_yaml(p)
    if isinstance(data, dict) and "step_correction" in data:
        raise ConfigError(f"hardware.step_correction: {p} was calibrated by an older version (one factor "
                          f"for the whole step); re-run `python -m simulator calibrate` to write "
                          f"work_correction and overhead_correction")
    return from_dict(HardwareProfile, with_quoted_peak(data), "hardware")


def with_quoted_peak(data: dict) -> dict:
    """A profile mapping whose `quoted_peak` names a device of the quoted-peak table gets that
    device's peaks as its `peak_tflops`."""
    key = data.get("quoted_peak")
    if not key:
        return data
    if data.get("peak_tflops"):
        raise ConfigError("hardware.quoted_peak: give either quoted_peak (a device of parallel/peaks.py) or "
                          "peak_tflops, not both")
    if key not in QUOTED_PEAKS_TFLOPS:
        raise ConfigError(f"hardware.quoted_peak: unknown device {key!r}; known: {', '.join(QUOTED_PEAKS_TFLOPS)} "
                          f"(parallel/peaks.py), or give peak_tflops")
    return {**data, "peak_tflops": dict(QUOTED_PEAKS_TFLOPS[key])}
