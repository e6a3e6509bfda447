"""The `memory:` section of a recipe: what each module kind recomputes, swaps to host, and whether
the optimizer lives on the host. One definition, read by the runtime (parallel/memory.py applies
it) and by the simulator (simulator/layout.py's coarse `recompute`/`swap`/`optimizer_offload`
fields map onto it through `simulator_policy`, and back through `MemoryConfig.summary`).

Module kinds and the region each one recomputes (torch.utils.checkpoint over that code):
- `norm`: every RMSNorm (drops its fp32 intermediates; the output stays saved by its consumer)
- `swiglu`: SiLU(a) * b and the down-projection (dense MLP, shared and routed experts): keeps the
  two up-projection outputs, drops the activation and its product
- `mla_up`: MLA's up-projections, RoPE and the core attention, from the latents: drops q, k, v
  (the attention kernel would keep them otherwise, so this region includes the core attention)
- `core_attention`: the attention kernel alone (keeps q, k, v, drops its internals)
- `expert_ffn`: the routed experts' grouped FFN (keeps only the permuted tokens)
- `moe_permute`: the dispatch (local permute and, under expert parallelism, the token exchange)
  and the routed experts' up-projections: drops the permuted tokens (the grouped GEMM's input,
  top_k * hidden per token), keeps the routing and the up-projection outputs; backward re-runs
  the dispatch, its exchange and the two up-projection GEMMs. The dispatch exchange then
  overlaps nothing (the shared expert moves behind the combine, moe/layer.py). Not with
  `expert_ffn` (the regions overlap)
- `layer`: the whole transformer block (keeps only its input); `full_layers: N` does this for the
  first N layers of each pipeline stage only

Swap kinds (tensors saved for backward inside that region go to host memory, prefetched back):
`attention` (the whole attention module: its input, latents, q/k/v, output), `core_attention`,
`expert_ffn`, `mlp` (the dense MLP and the shared expert).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from config import ConfigError

if TYPE_CHECKING:
    from moe.config import ModelConfig

RecomputeKind = Literal["norm", "swiglu", "mla_up", "core_attention", "expert_ffn", "moe_permute", "layer"]
SwapKind = Literal["attention", "core_attention", "expert_ffn", "mlp"]
RECOMPUTE_KINDS: tuple[str, ...] = get_args(RecomputeKind)
SWAP_KINDS: tuple[str, ...] = get_args(SwapKind)

# Swap region -> the recompute kinds whose region contains (or overlaps) it: tensors saved there are dropped by
# that recompute, so swapping them too is contradictory (and would fight checkpoint's own hooks).
_SWAP_INSIDE = {
    "attention": ("layer",),
    "core_attention": ("layer", "core_attention", "mla_up"),
    "expert_ffn": ("layer", "expert_ffn", "moe_permute"),
    "mlp": ("layer",),
}

# The simulator's coarse policies (simulator/layout.py) as runtime configs. "selective" is the
# fine-grained set simulator/memory.py drops under that name: norms, activations, MLA up-projections.
SIMULATOR_RECOMPUTE = {"none": [], "selective": ["norm", "swiglu", "mla_up"], "full": ["layer"]}
SIMULATOR_SWAP = ["attention", "expert_ffn"]


@dataclass
class MemoryConfig:
    recompute: list[RecomputeKind] = field(default_factory=list)
    full_layers: int = 0  # recompute the first N layers of each pipeline stage whole
    swap: list[SwapKind] = field(default_factory=list)
    swap_prefetch: bool = True  # on cuda/npu: bring the next region's tensors back ahead of backward
    optimizer_offload: bool = False  # fp32 master weights, Adam moments and the step on the host
    host_optimizer: Literal["auto", "torch", "deepspeed"] = "auto"  # auto: deepspeed if importable
    offload_chunk_mb: float = 64.0  # host -> device weight copies, per chunk (bounds device peak)
    measure: bool = True  # saved-activation bytes at peak, swapped bytes, state bytes, RSS per step

    def validate(self, path: str = "memory") -> None:
        p = f"{path}." if path else ""
        for name, kinds, allowed in (("recompute", self.recompute, RECOMPUTE_KINDS), ("swap", self.swap, SWAP_KINDS)):
            for k in kinds:
                if k not in allowed:
                    raise ConfigError(f"{p}{name}: unknown module kind {k!r}; allowed: {', '.join(allowed)}")
        if self.full_layers < 0:
            raise ConfigError(f"{p}full_layers: must be >= 0 (layers per stage recomputed whole), got {self.full_layers}")
        if "moe_permute" in self.recompute and "expert_ffn" in self.recompute:
            raise ConfigError(f"{p}recompute: 'moe_permute' and 'expert_ffn' both recompute the experts' "
                              "up-projections (overlapping regions); keep one of them")
        for k in self.swap:
            clash = [r for r in _SWAP_INSIDE[k] if r in self.recompute]
            if clash:
                raise ConfigError(f"{p}swap: {k!r} swaps tensors that recompute {clash[0]!r} already drops; "
                                  f"remove {k!r} from swap or {clash[0]!r} from recompute")
        if self.offload_chunk_mb <= 0:
            raise ConfigError(f"{p}offload_chunk_mb: must be > 0, got {self.offload_chunk_mb}")
        if self.host_optimizer != "auto" and not self.optimizer_offload:
            raise ConfigError(f"{p}host_optimizer: {self.host_optimizer!r} only applies with optimizer_offload: "
                              "true; set optimizer_offload: true or host_optimizer: auto")
        if self.optimizer_offload and self.host_optimizer == "deepspeed" and not deepspeed_available():
            raise ConfigError(f"{p}host_optimizer: 'deepspeed' needs the deepspeed extra (pip install "
                              "'ultramoe[deepspeed]'), which is not importable; use host_optimizer: torch or auto")

    def check_model(self, model: "ModelConfig", layers_per_stage: int, path: str = "memory") -> None:
        """The rules that need the model shape (from the recipe's validation)."""
        p = f"{path}." if path else ""
        if "mla_up" in self.recompute and model.attention != "mla":
            raise ConfigError(f"{p}recompute: 'mla_up' needs model.attention: mla (got {model.attention!r}); "
                              "use 'core_attention' instead")
        for name, kinds in (("recompute", self.recompute), ("swap", self.swap)):
            for k in ("expert_ffn", "moe_permute"):
                if k in kinds and model.num_moe_layers == 0:
                    raise ConfigError(f"{p}{name}: {k!r} needs MoE layers, but model.first_k_dense covers "
                                      "every layer; remove it")
        if self.full_layers > layers_per_stage:
            raise ConfigError(f"{p}full_layers: {self.full_layers} exceeds the {layers_per_stage} layers of a "
                              f"pipeline stage; use at most {layers_per_stage}")
        if self.swap and self.full_layers >= layers_per_stage:
            raise ConfigError(f"{p}swap: every layer is recomputed whole (full_layers={self.full_layers}), so "
                              "nothing is left to swap; lower full_layers or remove swap")

    @property
    def active(self) -> bool:
        return bool(self.recompute or self.full_layers or self.swap or self.optimizer_offload)

    def summary(self) -> tuple[str, bool, bool]:
        """The simulator's coarse (recompute, swap, optimizer_offload) for this config."""
        if "layer" in self.recompute:
            rec = "full"
        elif self.recompute:
            rec = "selective"
        else:
            rec = "none"
        return rec, bool(self.swap), self.optimizer_offload


def simulator_policy(recompute: str, swap: bool, optimizer_offload: bool) -> MemoryConfig:
    """The runtime config the simulator's coarse policy stands for (simulator/layout.py)."""
    if recompute not in SIMULATOR_RECOMPUTE:
        raise ConfigError(f"layout.recompute: got {recompute!r}; allowed: {', '.join(SIMULATOR_RECOMPUTE)}")
    rec = list(SIMULATOR_RECOMPUTE[recompute])
    # Under full recompute nothing is left to swap: the simulator then swaps nothing.
    cfg = MemoryConfig(recompute=rec, swap=list(SIMULATOR_SWAP) if swap and recompute != "full" else [],
                       optimizer_offload=optimizer_offload)
    cfg.validate("layout")
    return cfg


def deepspeed_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("deepspeed") is not None
