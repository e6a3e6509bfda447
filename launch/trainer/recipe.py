"""A training recipe: model shape, training settings, data and parallel layout, loaded from one YAML
file and validated as a whole before any device or process group is touched."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from config import ConfigError, apply_overrides, from_dict, load_yaml
from moe.config import ModelConfig, model_section
from parallel.config import ParallelConfig, check_sequence_parallel
from parallel.memory_config import MemoryConfig
from parallel.placement_config import PlacementConfig


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step (per data-parallel rank)
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast over fp32 master weights
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    kernels: Literal["auto", "reference", "fast"] = "auto"
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4  # batches of every evaluation (one always runs at the end)
    out_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{p}{name}: must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps > self.steps:  # the learning rate would never reach lr
            raise ConfigError(f"{p}warmup_steps: {self.warmup_steps} exceeds steps={self.steps}; "
                              "lower warmup_steps or raise steps")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"{p}min_lr: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"{p}beta1/beta2: must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.grad_clip < 0:
            raise ConfigError(f"{p}grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")


@dataclass
class DataConfig:
    path: str = "embedded"  # "embedded" (built on the fly) or a Megatron .bin/.idx prefix
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    cache_dir: str = "data"  # where the embedded corpus and dataset index caches go
    embedded_docs: int = 4000
    split: str = "98,2,0"  # Megatron's document split weights train,valid,test (test is never read)

    def validate(self, path: str = "") -> None:
        from launch.data.indexed import DataError, parse_split
        try:
            parse_split(self.split)
        except DataError as err:
            raise ConfigError(f"{path}.split: {err}") from None
        if self.path != "embedded":
            prefix = Path(self.path)
            missing = [s for s in (".bin", ".idx") if not prefix.with_name(prefix.name + s).is_file()]
            if missing:
                raise ConfigError(f"{path}.path: Megatron dataset {self.path}{missing[0]} not found; "
                                  "build it with `python -m launch.prepare_data` or use path: embedded")
        if self.embedded_docs < 1:
            raise ConfigError(f"{path}.embedded_docs: must be >= 1, got {self.embedded_docs}")


@dataclass
class CheckpointConfig:
    """Where and when checkpoints are written, and how a run resumes (see docs/CHECKPOINTS.md)."""

    dir: str = ""  # empty: <train.out_dir>/checkpoints
    interval: int = 500  # save every N steps; 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after each save
    async_save: bool = False  # copy to host memory, then write in a background thread
    save_at_end: bool = True
    resume: str = "auto"  # auto: newest complete checkpoint in dir, if any; never; or a checkpoint path
    fallback_to_previous: bool = True  # a corrupt newest checkpoint falls back to the one before it
    # What loading checks against the manifest. size: sha256 waits until the first save, which
    # refuses to publish (or prune) anything if the checkpoint it resumed from fails it.
    verify: Literal["checksum", "size"] = "checksum"

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        if self.interval < 0:
            raise ConfigError(f"{p}interval: must be >= 0 (0 saves only at the end), got {self.interval}")
        if self.keep_last < 1:
            raise ConfigError(f"{p}keep_last: must be >= 1, got {self.keep_last}")
        if not self.resume:
            raise ConfigError(f"{p}resume: use auto, never or the path of a checkpoint")


@dataclass
class ResilienceConfig:
    """What the training loop does about bad steps and signals (launch/trainer/resilience.py)."""

    max_nonfinite_in_row: int = 3  # abort after this many consecutive non-finite loss/grad-norm steps
    spike_factor: float = 0.0  # skip a step whose loss > factor x mean of recent losses; 0: off
    spike_window: int = 50  # accepted losses the spike detector averages over
    spike_min_history: int = 10  # accepted losses needed before spikes are detected
    max_spikes_in_row: int = 3  # abort after this many consecutive spikes
    handle_signals: bool = True  # SIGTERM/SIGINT: finish the step, save, exit cleanly
    # How long a rank waits for its peers (start-up, each collective) before naming the silent rank
    # and exiting; long enough for the slowest legitimate wait (a large checkpoint save or load).
    collective_timeout_s: float = 600.0

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        if not self.collective_timeout_s > 0 or self.collective_timeout_s == float("inf"):
            raise ConfigError(f"{p}collective_timeout_s: must be a finite number of seconds > 0, "
                              f"got {self.collective_timeout_s}")
        for name in ("max_nonfinite_in_row", "max_spikes_in_row", "spike_window", "spike_min_history"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ConfigError(f"{p}spike_factor: must be > 1 (or 0 to disable), got {self.spike_factor}")
        if self.spike_min_history > self.spike_window:
            raise ConfigError(f"{p}spike_min_history: {self.spike_min_history} exceeds spike_window="
                              f"{self.spike_window}; lower it or widen the window")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)  # YAML: inline mapping or a path to a model YAML
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # recompute, swap, optimizer offload
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # dynamic expert placement

    def validate(self, path: str = "") -> None:
        par = self.parallel  # layers of the largest pipeline stage: full_layers counts per stage
        per_stage = (max(par.pp_stage_layers) if par.pp_stage_layers else
                     -(-(self.model.num_layers + self.model.noop_layers) // (par.pp * par.vpp)))
        self.memory.check_model(self.model, per_stage)
        self.placement.check_recipe(self.parallel, self.model, self.memory)
        check_sequence_parallel(self.parallel, self.model, self.train.seq_len)
        if par.fb_overlap and ("layer" in self.memory.recompute or self.memory.full_layers):
            what = "memory.recompute: layer" if "layer" in self.memory.recompute else "memory.full_layers"
            raise ConfigError(f"{what}: recomputing whole layers re-runs their routers in backward, which "
                              "parallel.fb_overlap runs beside the next forward's routers (shared counters); "
                              "use finer recompute kinds or set parallel.fb_overlap: false")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len: {self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}; shorten seq_len or raise max_seq_len")


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load a recipe YAML. `model` may be a mapping or a path (relative to the recipe file) to a model
    YAML. `overrides` maps dotted keys ("train.steps") to values and is applied before validation."""
    data = load_yaml(path)
    data["model"] = model_section(data.get("model", {}), Path(path).parent)
    apply_overrides(data, overrides or {}, str(path))
    return from_dict(Recipe, data)
