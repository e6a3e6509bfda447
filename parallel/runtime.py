"""One object that applies the whole parallel layout to a model and a training loop.

`ParallelRuntime.setup` (after `torch.distributed` is initialised, on every rank) builds the meshes;
`parallelize(model)` splits attention and dense MLPs over the TP group, shards the experts, and
installs the dispatchers and the gradient reducer; `shards` then says where each split parameter
sits in the full one (for checkpoints and tests);
`wrap_optimizer` adds ZeRO-1 when configured; `step_metrics` and `mean_over_dp` produce the log line
(collectives: call them on every rank). Used by launch/trainer/ under torchrun and by the tests.

Pipeline parallelism: `build_model` builds only this rank's stages (parallel/pipeline.py) where
pp > 1, the whole model otherwise; `attach_pipeline` then creates the schedule, and
`forward_backward` / `eval_lm_loss` replace the trainer's single-process micro-batch loop and
evaluation (both None without a pipeline). Without one, `parallel.fb_overlap` gives the trainer's
loop a `backward_lane` (parallel/fb_overlap.py) and the backward thread its own process groups.

`LocalRuntime` is the same interface for a single process (world size 1): no process group, no
split parameters, the gradient norm and clipping of one process, identity averages. The trainer
always holds one of the two, so its code has no single-process special cases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from config import ConfigError
from moe.config import ModelConfig
from parallel import emulated_links
from parallel.comm import CommStats
from parallel.config import ParallelConfig, check_pipeline, check_runtime_support
from parallel.data_parallel import GradReducer, local_grad_norm
from parallel.expert_parallel import apply_expert_parallel
from parallel.fb_overlap import BackwardLane
from parallel import lanes
from parallel.layout import Layout, Shard
from parallel.mesh import Meshes
from parallel.metrics import step_metrics
from parallel.pipeline import PipelineModel
from parallel.pipeline_layout import stage_plan
from parallel.tensor_parallel import TPPlan, apply_tensor_parallel
from parallel.vocab_parallel import apply_vocab_parallel
from parallel.zero import ZeroOptimizer

if TYPE_CHECKING:  # torch.distributed.pipelining takes seconds to import: only runs with pp > 1 do
    from parallel.pipeline_schedule import PipelineRunner


def validate_layout(cfg: ParallelConfig, model: ModelConfig, world: int,
                    micro_batches: Optional[int] = None) -> Layout:
    """Every check that needs no process group; call it before creating one. `micro_batches`
    (train.grad_accum) is checked against the pipeline schedule when given."""
    layout = Layout.build(cfg, world, model)
    check_runtime_support(cfg)
    if model is not None:
        check_pipeline(cfg, model, micro_batches)
    return layout


def build_full_model(model: ModelConfig, kernels) -> nn.Module:
    from moe.model import MoETransformer
    return MoETransformer(model, kernels)


@dataclass
class ParallelRuntime:
    cfg: ParallelConfig
    layout: Layout
    meshes: Meshes
    stats: CommStats
    device: str = "cpu"
    expert_param_names: list[str] = field(default_factory=list)
    # Every split parameter: the blocks of the full tensor this rank holds (EP, expert TP, TP).
    shards: dict[str, tuple[Shard, ...]] = field(default_factory=dict)
    tp_partial_names: list[str] = field(default_factory=list)  # replicated inside a TP region
    grad_reducer: Optional[GradReducer] = None
    runner: Optional["PipelineRunner"] = None
    backward_lane: Optional[BackwardLane] = None  # fb_overlap: backwards beside the next forwards

    @classmethod
    def setup(cls, cfg: ParallelConfig, model: ModelConfig, device: str = "cpu",
              micro_batches: Optional[int] = None) -> "ParallelRuntime":
        if cfg.emulate_links is not None and device != "cpu":
            raise ConfigError(f"parallel.emulate_links: emulated links delay gloo collectives on CPU, not {device}'s; "
                              "remove emulate_links or set train.device: cpu")
        layout = validate_layout(cfg, model, dist.get_world_size(), micro_batches)
        nodes = cfg.dispatcher == "hierarchical" and layout.ep > 1
        meshes = Meshes.build(layout, device, nodes=nodes)
        if cfg.fb_overlap:
            lanes.build_twins(meshes)  # the backward thread's own groups (collective)
        # Every runtime collective is timed (exposure metrics), and delayed when links are emulated.
        emulated_links.install(cfg.emulate_links, layout.node_of, dist.get_rank())
        return cls(cfg, layout, meshes, CommStats(dist.get_rank(), layout.node_of), device)

    @property
    def rank(self) -> int:
        return self.meshes.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.meshes.dp_rank()

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def pp_rank(self) -> int:
        return self.meshes.pp_rank()

    def build_model(self, model: ModelConfig, kernels) -> nn.Module:
        """This rank's model: the whole model without a pipeline, else only this rank's stages.
        Seed torch's generator the same on every rank first."""
        if self.layout.pp == 1:
            return build_full_model(model, kernels)
        return PipelineModel(model, kernels, stage_plan(self.cfg, model), self.pp_rank)

    def attach_pipeline(self, model: nn.Module, micro_batches: int, micro_batch_size: int, seq_len: int) -> None:
        """Create the pipeline schedule for `model` (after `parallelize`); no-op without pp.
        Also tells the overlapped gradient reduction how many backward passes make one step."""
        if self.grad_reducer is not None:
            self.grad_reducer.set_micro_batches(micro_batches)
        if self.cfg.fb_overlap and not isinstance(model, PipelineModel):
            self.backward_lane = BackwardLane()
        if isinstance(model, PipelineModel):
            from parallel.pipeline_schedule import PipelineRunner
            emulated_links.patch_pipeline_p2p()
            sp = self.layout.tp if self.cfg.sequence_parallel else 1
            self.runner = PipelineRunner(model, self.meshes.pp_group, micro_batches, micro_batch_size,
                                         seq_len, self.device, seq_shards=sp, fb_overlap=self.cfg.fb_overlap)

    @property
    def forward_backward(self):
        return self.runner.forward_backward if self.runner is not None else None

    @property
    def eval_lm_loss(self):
        return self.runner.eval_lm_loss if self.runner is not None else None

    def parallelize(self, model: nn.Module) -> nn.Module:
        """In place: `model` must come from `build_model` (the full single-device model, or this
        rank's pipeline stages), built with the same seed on every rank."""
        tp = TPPlan()
        sp = self.cfg.sequence_parallel and self.layout.tp > 1
        if self.layout.tp > 1:
            tp = apply_tensor_parallel(model, self.meshes.tp_group, self.meshes.tp_rank(), self.layout.tp, sp)
            if self.cfg.vocab_parallel:
                tp.shards.update(apply_vocab_parallel(model, self.meshes.tp_group, self.meshes.tp_rank(), self.layout.tp))
        experts = apply_expert_parallel(model, self.meshes, self.cfg.dispatcher, self.stats, self.cfg.overlap, sp)
        self.expert_param_names = list(experts)
        self.shards = {**tp.shards, **{n: s for n, s in experts.items() if s}}
        self.tp_partial_names = tp.partial
        shared = model.embed.weight if isinstance(model, PipelineModel) and (
            model.embedding_copy or (model.has_first and model.cfg.mtp_layers + model.cfg.tie_embeddings > 0)) else None
        counted = not (isinstance(model, PipelineModel) and model.embedding_copy)
        self.grad_reducer = GradReducer(model, self.meshes, self.expert_param_names, tp.shards, tp.partial,
                                        shared_embedding=shared, embedding_counted=counted,
                                        bucket_bytes=int(self.cfg.grad_bucket_mb * 2**20))
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        if not self.cfg.zero1:
            return optimizer
        return ZeroOptimizer(optimizer, model, self.meshes, self.expert_param_names)

    def step_metrics(self) -> dict:
        out = step_metrics(self.stats, self.meshes, self.device)
        out.update(emulated_links.exposure_metrics(self.device))
        if self.runner is not None:
            out.update(self.runner.step_metrics())
        if self.backward_lane is not None:
            out.update(self.backward_lane.take_metrics())  # this rank's (rank 0 logs)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def mean_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        """Average per-rank scalars (local-micro-batch losses) into global-batch values."""
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64 if self.device == "cpu"
                         else torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.meshes.dp_group)
        return {k: float(v) / self.layout.dp for k, v in zip(keys, t.tolist())}


@dataclass
class LocalRuntime:
    """`ParallelRuntime`'s interface for one process: rank 0 of a world of 1, nothing split, no
    collectives. `grad_reducer` clips (or only measures) the local gradients exactly as a
    single-device loop does, so losses are those of the plain single-process run."""

    layout: Layout
    device: str = "cpu"
    stats: CommStats = field(default_factory=lambda: CommStats(0, lambda rank: 0))
    expert_param_names: list[str] = field(default_factory=list)
    shards: dict[str, tuple[Shard, ...]] = field(default_factory=dict)
    tp_partial_names: list[str] = field(default_factory=list)
    rank: int = 0
    is_main: bool = True
    dp_rank: int = 0
    dp_size: int = 1
    pp_rank: int = 0
    forward_backward = None  # the trainer's own micro-batch loop
    # fb_overlap in one process: no exchange to hide, but the same loop (backwards on a worker)
    backward_lane: Optional[BackwardLane] = None
    eval_lm_loss = None

    @classmethod
    def setup(cls, cfg: Optional[ParallelConfig] = None, model: Optional[ModelConfig] = None,
              device: str = "cpu") -> "LocalRuntime":
        """Validates `cfg` (default: the trivial layout) for a world of one process."""
        cfg = cfg if cfg is not None else ParallelConfig()
        return cls(validate_layout(cfg, model, 1), device, backward_lane=BackwardLane() if cfg.fb_overlap else None)

    @staticmethod
    def grad_reducer(params, max_norm: float = 0.0) -> float:
        return local_grad_norm(params, max_norm)

    @staticmethod
    def build_model(model: ModelConfig, kernels) -> nn.Module:
        return build_full_model(model, kernels)

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def attach_pipeline(self, model: nn.Module, micro_batches: int, micro_batch_size: int, seq_len: int) -> None:
        pass

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        return optimizer

    def step_metrics(self) -> dict:
        return {}

    def barrier(self) -> None:
        pass

    def mean_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in values.items()}


Runtime = Union[ParallelRuntime, LocalRuntime]
