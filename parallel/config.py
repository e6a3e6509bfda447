"""The parallel layout of a run, as a typed config shared by the runtime and the simulator.

`ParallelConfig` is the one definition of a layout: the trainer reads it from a recipe's `parallel:`
section, and the simulator's `Layout` (simulator/layout.py) is this class plus the fields only the
simulator varies today (batch, recomputation and swap policy).

`validate()` checks the fields on their own (from the YAML loader); `check_world()` checks the layout
against a world size and a model shape. Both the trainer (before any process group is created) and
the simulator (for every layout it costs) call `check_world`, so a layout one accepts the other
accepts, and a bad one is the same `ConfigError` naming the field to change. `check_runtime_support`
names the fields the training runtime cannot run yet. `check_pipeline` holds the pipeline rules that
need the model depth and the number of micro-batches (the trainer's `train.grad_accum`); the
simulator pads layers and checks its own batch, so it keeps those rules in simulator/layout.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, get_args

from config import ConfigError

if TYPE_CHECKING:
    from moe.config import ModelConfig

Dispatcher = Literal["local", "allgather", "alltoall", "hierarchical", "auto"]
# the dispatchers the runtime builds; "auto" is resolved to one of them by the trainer set-up
# (launch/trainer/auto_dispatch.py asks the simulator) before the runtime exists
DISPATCHERS: tuple[str, ...] = tuple(d for d in get_args(Dispatcher) if d != "auto")
# how a pipeline stage's ranks are numbered: attention-side dims innermost first (parallel/layout.py)
DEFAULT_RANK_ORDER = "tp-cp-dp"  # Megatron's: a TP group is consecutive ranks
RANK_ORDERS = ("tp-cp-dp", "tp-dp-cp", "dp-cp-tp", "cp-dp-tp")  # tp innermost or outermost


@dataclass
class LinkSpec:
    """One emulated link class: per-step latency and per-device bandwidth (GB/s, one direction),
    the units of the simulator's hardware `Link`."""
    latency_us: float = 10.0
    bandwidth_gbps: float = 10.0


@dataclass
class EmulateLinks:
    """Emulated links for gloo runs (parallel/emulated_links.py): each collective completes only
    after the time the simulator's link model gives its bytes on these links."""
    intra_node: LinkSpec = field(default_factory=LinkSpec)
    inter_node: LinkSpec = field(default_factory=LinkSpec)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    etp: Optional[int] = None  # expert tensor parallelism; None = same as tp
    tp_extend_ep: bool = False  # MoE layers: TP ranks split experts instead of expert weights
    sequence_parallel: bool = False  # with TP: shard the tokens outside TP regions over the TP ranks
    # with TP: embedding, output head and cross-entropy split over the vocabulary (parallel/vocab_parallel.py)
    vocab_parallel: bool = True
    dispatcher: Dispatcher = "alltoall"
    devices_per_node: int = 8  # node structure for the hierarchical all-to-all; a setting on CPU
    # attention-side dims of a stage, innermost first; tp last keeps EP peers on one node (layout.py)
    rank_order: str = DEFAULT_RANK_ORDER
    zero1: bool = False  # shard optimizer states over data-parallel ranks
    overlap: bool = True  # run the shared expert while the dispatch communication is in flight
    # run a micro-batch's backward beside a later one's forward (parallel/fb_overlap.py, pipeline_overlap.py)
    fb_overlap: bool = False
    vpp: int = 1  # virtual pipeline stages (model chunks) per pipeline rank: interleaved 1F1B when > 1
    # real layers of each virtual stage (index chunk * pp + rank, pp * vpp entries, summing to
    # model.num_layers); None: equal stages, model.noop_layers padding the depth
    pp_stage_layers: Optional[list[int]] = None
    # CPU test device: delay each collective to the time it takes on these links (None: off)
    emulate_links: Optional[EmulateLinks] = None
    # all-reduce gradients in buckets of this many MB during backward (0: one blocking reduction after it)
    grad_bucket_mb: float = 0.0
    # dispatcher: auto predicts with this simulator hardware profile (name or YAML path; None: the
    # device's default, configs/hardware); emulate_links, when set, replaces its links
    dispatcher_profile: Optional[str] = None

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("tp", "pp", "ep", "cp", "vpp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"{p}vpp: interleaved stages need pp > 1; set vpp: 1 or raise pp")
        if self.pp_stage_layers is not None:
            if len(self.pp_stage_layers) != self.pp * self.vpp:
                raise ConfigError(f"{p}pp_stage_layers: needs one layer count per virtual stage, pp*vpp = "
                                  f"{self.pp}*{self.vpp} = {self.pp * self.vpp}, got {len(self.pp_stage_layers)}")
            if min(self.pp_stage_layers) < 0:
                raise ConfigError(f"{p}pp_stage_layers: layer counts must be >= 0, got {self.pp_stage_layers}")
        if self.devices_per_node is not None and self.devices_per_node < 1:
            raise ConfigError(f"{p}devices_per_node: must be >= 1, got {self.devices_per_node}")
        if self.etp is not None and self.etp < 1:
            raise ConfigError(f"{p}etp: must be >= 1 (or null for etp = tp), got {self.etp}")
        if self.tp_extend_ep and self.etp not in (None, 1):
            raise ConfigError(f"{p}etp: tp_extend_ep splits experts over the TP ranks, so expert weights "
                              f"are not split; set etp to 1 or null, got {self.etp}")
        if self.rank_order not in RANK_ORDERS:
            raise ConfigError(f"{p}rank_order: {self.rank_order!r} is not one of {', '.join(RANK_ORDERS)} (the dims of "
                              "a pipeline stage, innermost first; tp innermost, Megatron's tp-cp-dp, or outermost)")
        if not self.rank_order.startswith("tp") and self.tp > 1 and self.expert_tp != self.tp:
            what = "tp_extend_ep" if self.tp_extend_ep else f"etp = {self.expert_tp}"
            raise ConfigError(f"{p}rank_order: {self.rank_order} puts tp outermost, which needs expert TP to be the "
                              f"TP group (etp = tp); {what} needs tp innermost: use tp-cp-dp or tp-dp-cp")
        if self.grad_bucket_mb < 0:
            raise ConfigError(f"{p}grad_bucket_mb: must be >= 0 (0 reduces after backward), got {self.grad_bucket_mb}")
        if self.emulate_links is not None:
            for side in ("intra_node", "inter_node"):
                link = getattr(self.emulate_links, side)
                if link.bandwidth_gbps <= 0:
                    raise ConfigError(f"{p}emulate_links.{side}.bandwidth_gbps: must be > 0 GB/s, "
                                      f"got {link.bandwidth_gbps}")
                if link.latency_us < 0:
                    raise ConfigError(f"{p}emulate_links.{side}.latency_us: must be >= 0, got {link.latency_us}")
        # The YAML loader checks the Literal already; this catches configs built in code.
        if self.dispatcher not in DISPATCHERS + ("auto",):
            raise ConfigError(f"{p}dispatcher: unknown dispatcher {self.dispatcher!r}; "
                              f"allowed: {', '.join(repr(d) for d in DISPATCHERS + ('auto',))}")
        if self.dispatcher_profile is not None and self.dispatcher != "auto":
            raise ConfigError(f"{p}dispatcher_profile: only used by dispatcher: auto (got dispatcher: "
                              f"{self.dispatcher!r}); remove it or set dispatcher: auto")

    @property
    def expert_parallel(self) -> int:
        """Ranks the experts of one MoE layer are split over (TP-extend-EP folds the TP ranks in)."""
        return self.ep * self.tp if self.tp_extend_ep else self.ep

    @property
    def expert_tp(self) -> int:
        """Ranks each expert's weights are split over."""
        if self.tp_extend_ep:
            return 1
        return self.tp if self.etp is None else self.etp

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tp * self.cp * self.pp)

    @property
    def vocab_shards(self) -> int:
        """Ranks the embedding and output head are split over (parallel/vocab_parallel.py)."""
        return self.tp if self.vocab_parallel else 1

    def check_world(self, world_size: int, model: Optional["ModelConfig"] = None, path: str = "parallel",
                    devices_per_node: Optional[int] = None) -> None:
        """Raise ConfigError unless this layout tiles `world_size` ranks (and fits `model`).
        `devices_per_node` stands in for the field when that is unset (the simulator's layouts
        take it from the hardware profile)."""
        self.validate(path)
        p = f"{path}." if path else ""
        dense = self.tp * self.cp * self.pp
        if world_size % dense:
            raise ConfigError(f"{p}tp: world size {world_size} is not a multiple of tp*cp*pp = "
                              f"{self.tp}*{self.cp}*{self.pp} = {dense}; change tp/cp/pp or the number of processes")
        stage = world_size // self.pp  # ranks of one pipeline stage: both sides tile them
        ep_size, etp = self.expert_parallel, self.expert_tp
        if stage % (ep_size * etp):
            what = f"ep*tp = {ep_size}" if self.tp_extend_ep else f"ep = {self.ep}"
            if etp != self.tp and not self.tp_extend_ep:
                what += f" (times etp = {etp})"
            raise ConfigError(f"{p}ep: {what} does not divide the {stage} ranks of a pipeline stage "
                              f"(world size {world_size} / pp {self.pp}); choose ep among {_divisors(stage // etp)} "
                              f"or start a multiple of {self.pp * math.lcm(ep_size * etp, self.tp * self.cp)} processes")
        if model is not None and model.num_experts % ep_size:
            raise ConfigError(f"{p}ep: model.num_experts={model.num_experts} is not divisible by "
                              f"{'ep*tp' if self.tp_extend_ep else 'ep'}={ep_size}; choose ep among "
                              f"{_divisors(model.num_experts)}")
        if model is not None:
            self._check_tp_split(model, p)
        node = devices_per_node if self.devices_per_node is None else self.devices_per_node
        if node is not None and world_size > node and world_size % node:
            raise ConfigError(f"{p}devices_per_node: {node} does not divide the world size "
                              f"{world_size}; set it to the number of ranks on each node")
        if self.dispatcher == "local" and ep_size > 1:
            raise ConfigError(f"{p}dispatcher: 'local' keeps every expert on every rank, but ep={ep_size}; "
                              "use 'alltoall', 'allgather' or 'hierarchical', or set ep: 1")
        if self.dispatcher == "hierarchical" and ep_size > 1:
            if etp != 1:
                raise ConfigError(f"{p}dispatcher: 'hierarchical' needs contiguous EP groups; "
                                  "set tp_extend_ep: true or tp: 1")
            if node is not None and ep_size % node and node % ep_size:
                raise ConfigError(f"{p}devices_per_node: the hierarchical dispatcher needs each EP group to "
                                  f"fill whole nodes or fit inside one; ep={ep_size} and devices_per_node="
                                  f"{node} do not divide one another")

    def _check_tp_split(self, model: "ModelConfig", p: str) -> None:
        """Every width that tensor parallelism splits must divide evenly over its ranks."""
        tp, etp = self.tp, self.expert_tp
        widths = [("tp", tp, "model.num_heads", model.num_heads, "")]
        if model.attention == "gqa":
            widths.append(("tp", tp, "model.num_kv_heads", model.num_kv_heads, ""))
        moe = model.num_moe_layers > 0
        if model.first_k_dense > 0 or (model.mtp_layers > 0 and not moe):  # some layer has a dense MLP
            widths.append(("tp", tp, "model.dense_ffn_size", model.dense_ffn_size, ""))
        if moe and model.num_shared_experts > 0:
            widths.append(("tp", tp, "the shared experts' width model.num_shared_experts*expert_ffn_size",
                           model.num_shared_experts * model.expert_ffn_size, ""))
        if moe and not self.tp_extend_ep:
            widths.append(("etp" if self.etp is not None and self.etp != tp else "tp", etp,
                           "model.expert_ffn_size", model.expert_ffn_size,
                           ", or set tp_extend_ep: true (TP ranks then split experts, not their weights)"))
        if self.vocab_parallel:
            widths.append(("tp", tp, "model.vocab_size", model.vocab_size,
                           ", pad the vocabulary to a multiple of tp, or set vocab_parallel: false (every TP rank "
                           "then holds the whole embedding and head)"))
        for name, ranks, what, n, alternative in widths:
            if n % ranks:
                raise ConfigError(f"{p}{name}: {what}={n} is not divisible by {name}={ranks}; choose {name} among "
                                  f"{_divisors(n)}{alternative}")


def check_pipeline(cfg: ParallelConfig, model: "ModelConfig", micro_batches: Optional[int] = None,
                   path: str = "parallel") -> None:
    """The pipeline rules that need the model's depth and the micro-batches per step: the layers
    split into pp*vpp virtual stages as asked, and the schedule has enough micro-batches."""
    p = f"{path}." if path else ""
    chunks = cfg.pp * cfg.vpp
    if cfg.pp_stage_layers is not None:
        if cfg.pp == 1:
            raise ConfigError(f"{p}pp_stage_layers: only means something with pp > 1; remove it or raise pp")
        if sum(cfg.pp_stage_layers) != model.num_layers:
            raise ConfigError(f"{p}pp_stage_layers: {cfg.pp_stage_layers} sum to {sum(cfg.pp_stage_layers)} layers, "
                              f"model.num_layers is {model.num_layers}; list every layer once")
        if model.noop_layers:
            raise ConfigError(f"{p}pp_stage_layers: give either explicit stage sizes or model.noop_layers "
                              f"padding ({model.noop_layers}), not both; set model.noop_layers: 0")
    elif cfg.pp > 1:
        total = model.num_layers + model.noop_layers
        if total % chunks:
            raise ConfigError(f"{p}pp: {total} layers (model.num_layers={model.num_layers} + model.noop_layers="
                              f"{model.noop_layers}) do not split into pp*vpp={chunks} equal stages; set "
                              f"model.noop_layers to {model.noop_layers + -total % chunks}, list the layers of each "
                              f"stage in {p}pp_stage_layers, or change pp/vpp")
    if cfg.fb_overlap and micro_batches is not None and micro_batches < 2:
        raise ConfigError(f"train.grad_accum: {p}fb_overlap runs a micro-batch's backward beside the next one's "
                          f"forward, so it needs at least 2 micro-batches per step, got {micro_batches}; raise "
                          f"train.grad_accum or set {p}fb_overlap: false")
    if cfg.pp > 1 and micro_batches is not None:
        if micro_batches < cfg.pp:
            raise ConfigError(f"train.grad_accum: {micro_batches} micro-batches per step are fewer than the pp="
                              f"{cfg.pp} pipeline stages; raise train.grad_accum to at least {cfg.pp}")
        if cfg.vpp > 1 and micro_batches % cfg.pp:
            raise ConfigError(f"train.grad_accum: the interleaved schedule (vpp={cfg.vpp}) needs micro-batches "
                              f"divisible by pp={cfg.pp}, got {micro_batches}; use a multiple of {cfg.pp}")


def check_runtime_support(cfg: ParallelConfig, path: str = "parallel") -> None:
    """The config may describe layouts the simulator evaluates but the runtime cannot run yet."""
    p = f"{path}." if path else ""
    if cfg.dispatcher == "auto":
        raise ConfigError(f"{p}dispatcher: 'auto' must be resolved before the runtime is built (the trainer "
                          "set-up does it: launch/trainer/auto_dispatch.resolve_dispatcher); call that, or name "
                          f"one of {', '.join(DISPATCHERS)}")
    if cfg.cp != 1:
        raise ConfigError(f"{p}cp: cp={cfg.cp} is not supported by the training runtime yet (tensor, expert, "
                          f"pipeline and data parallelism are); set cp: 1")
    if cfg.etp is not None and cfg.etp != cfg.tp and not cfg.tp_extend_ep:
        raise ConfigError(f"{p}etp: expert tensor parallelism other than tp (etp={cfg.etp}, tp={cfg.tp}) is not "
                          f"supported by the training runtime yet; set etp: null, or tp_extend_ep: true")
    if cfg.sequence_parallel and cfg.tp == 1:
        raise ConfigError(f"{p}sequence_parallel: splits the tokens over the TP ranks, but tp=1; set tp > 1 "
                          "or sequence_parallel: false")


def check_sequence_parallel(cfg: ParallelConfig, model: "ModelConfig", seq_len: int, path: str = "parallel") -> None:
    """The sequence-parallel rules that need the model and the sequence length (train.seq_len)."""
    if not (cfg.sequence_parallel and cfg.tp > 1):
        return
    p = f"{path}." if path else ""
    if seq_len % cfg.tp:
        raise ConfigError(f"{p}sequence_parallel: train.seq_len={seq_len} does not split evenly over tp={cfg.tp} "
                          f"ranks; choose seq_len a multiple of {cfg.tp}, or set sequence_parallel: false")
    if model.capacity_factor is not None and model.num_moe_layers > 0:
        raise ConfigError(f"{p}sequence_parallel: model.capacity_factor={model.capacity_factor} drops tokens by "
                          "their order in the micro-batch, which no TP rank sees whole under sequence "
                          "parallelism; set capacity_factor: null (dropless) or sequence_parallel: false")
