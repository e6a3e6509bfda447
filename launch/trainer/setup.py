"""The trainer's public set-up: `build_context(recipe)` turns a recipe into a ready
`TrainingContext`, on every rank of a torchrun launch or in a single process alike.

Order matters and is fixed here once: `parallel.dispatcher: auto` is resolved to a named
dispatcher (auto_dispatch.py, before anything validates the layout for the runtime), the parallel
layout is validated and the process group
started (`distributed.init_distributed`), the device's peak measured (before any other start-up
work, which would depress a CPU timing), the seeds set, the full model built and handed to the
runtime to shard (before the optimizer exists: expert parameters are replaced by their shards),
the optimizer built and wrapped (ZeRO-1), then the data iterators over this data-parallel rank's
slice of the global batch. The training loop (loop.py) and the simulator's validation worker
(launch/validate_worker.py) both start from here, so they time and train the same thing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from config import ConfigError
from launch.trainer.auto_dispatch import resolve_dispatcher
from launch.trainer.distributed import init_distributed, world_from_env
from launch.trainer.preflight import preflight
from launch.trainer.recipe import Recipe, TrainConfig
from launch.trainer.step import LOSS_KEYS, evaluate, lr_at, seed_everything, train_step
from moe.accounting import model_flops_per_token
from moe.model import MoETransformer
from parallel.config import check_pipeline
from parallel.device import Peak, device_peak, resolve_device_type
from parallel.memory import MemoryManager, apply_memory
from parallel.offload import offload_optimizer
from parallel.placement_runtime import ExpertPlacement, apply_placement
from parallel.runtime import Runtime


def build_model(recipe: Recipe, device: str = "cpu", runtime: Optional[Runtime] = None) -> torch.nn.Module:
    """The model this process trains: the whole MoETransformer, or under pipeline parallelism
    only this rank's stages (`runtime.build_model`), initialised from the recipe's seed."""
    from moe_kernels import get_kernels
    torch.manual_seed(recipe.train.seed)
    kernels = get_kernels(recipe.train.kernels, device_type=device)
    model = runtime.build_model(recipe.model, kernels) if runtime is not None else MoETransformer(recipe.model, kernels)
    return model.to(device)


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices only: norm gains are scales whose decay would fight the DSSN initialisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is several times faster than the per-tensor path on CPU and CUDA.
    device = next(model.parameters()).device.type
    fused = True if device in ("cpu", "cuda") else None
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, fused=fused)


def build_data(recipe: Recipe, rank: int = 0, world: int = 1, start_sample: int = 0):
    """Train iterator and a function returning a fresh validation iterator."""
    from launch.data.datasets import BatchIterator, build_datasets, ensure_embedded_dataset
    from launch.data.tokenizer import load_tokenizer
    t, d = recipe.train, recipe.data
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {recipe.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; raise vocab_size to at least {tokenizer.vocab_size}")
    prefix = ensure_embedded_dataset(d.cache_dir, num_docs=d.embedded_docs) if d.path == "embedded" else d.path
    samples_per_step = t.micro_batch_size * t.grad_accum * world
    train_ds, valid_ds = build_datasets(
        prefix, t.seq_len, {"train": samples_per_step * t.steps, "valid": t.micro_batch_size * t.eval_batches * world},
        seed=t.seed, tokenizer=tokenizer, cache_dir=d.cache_dir, split=d.split)
    train_it = BatchIterator(train_ds, t.micro_batch_size, start_sample=start_sample, rank=rank, world=world)
    return train_it, (lambda: BatchIterator(valid_ds, t.micro_batch_size, rank=rank, world=world))


@dataclass
class TrainingContext:
    """Everything one rank trains with. `train_step` and `eval_loss` are collectives under
    torchrun (call them on every rank); `log` is True on the rank that writes logs."""

    recipe: Recipe
    runtime: Runtime
    device: str
    peak: Peak
    model: MoETransformer
    optimizer: torch.optim.Optimizer
    train_it: Iterator[dict]
    valid_it: Callable[[], Iterator[dict]]
    log: bool
    memory: Optional[MemoryManager] = None  # recompute/swap applied to the model; memory metrics
    placement: Optional[ExpertPlacement] = None  # dynamic expert placement (recipe `placement:`)
    skew: Optional[object] = None  # the skewed-routing workload (parallel/skew.py), when configured

    @property
    def tokens_per_step(self) -> int:
        t = self.recipe.train
        return t.micro_batch_size * t.seq_len * t.grad_accum * self.runtime.dp_size

    @property
    def flops_per_token(self) -> float:
        return model_flops_per_token(self.recipe.model, self.recipe.train.seq_len)

    def train_step(self, step: int, check_step: Optional[Callable[[float, float], Optional[str]]] = None) -> dict:
        """Optimizer step `step` (0-based) at its scheduled learning rate; this rank's metrics."""
        t = self.recipe.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        if self.skew is not None:
            self.skew.set_step(step)
        with self.memory.step(self.model) if self.memory is not None else contextlib.nullcontext():
            m = train_step(self.model, self.optimizer, self.train_it, t, self.device,
                           grad_reducer=self.runtime.grad_reducer, check_step=check_step,
                           pipeline=self.runtime.forward_backward, backward_lane=self.runtime.backward_lane)
        if self.memory is not None:
            m.update(self.memory.metrics(self.model, self.optimizer))
        # after the optimizer step, experts move with their state; a skipped step's routing counts
        # (a bad batch) must not steer placement, as they do not steer the router bias
        if self.placement is not None and not m["skipped"]:
            m.update(self.placement.after_step([torch.tensor(x) for x in m["expert_load"]], self.optimizer))
        return m

    def global_metrics(self, m: dict) -> dict:
        """`m` with the global-batch losses, and the bytes and tokens the dispatchers moved."""
        m.update(self.runtime.mean_over_dp({k: m[k] for k in LOSS_KEYS}))
        m.update(self.runtime.step_metrics())
        return m

    def eval_loss(self) -> float:
        t = self.recipe.train
        loss = evaluate(self.model, self.valid_it(), t.eval_batches, t, self.device,
                        pipeline_lm_loss=self.runtime.eval_lm_loss)
        self.runtime.stats.reset()  # evaluation traffic is not part of the next training step's metrics
        return self.runtime.mean_over_dp({"eval": loss})["eval"]


def _log_param_bytes(model: torch.nn.Module, runtime: Runtime) -> None:
    """Each rank's parameter bytes (only its stages are built), printed by rank 0 (a collective)."""
    import torch.distributed as dist
    mine = torch.tensor([float(sum(p.numel() * p.element_size() for p in model.parameters()))], device=runtime.device)
    every = [torch.zeros(1, device=runtime.device) for _ in range(runtime.layout.world)]
    dist.all_gather(every, mine)
    if runtime.is_main:
        print("parameter bytes per rank: " + ", ".join(f"{r}: {int(b)}" for r, b in enumerate(torch.cat(every).cpu().tolist())),
              flush=True)


def build_context(recipe: Recipe, log: bool = True, measure_peak: bool = True) -> TrainingContext:
    """The recipe's runtime, device, model, optimizer and data on this process, ready to train.
    Under torchrun (WORLD_SIZE > 1) every rank builds the full model from the same seed and the
    runtime shards it; each data-parallel rank reads its slice of the global batch. `log` is kept
    on rank 0 only. Without `measure_peak` the (on CPU, timed) device peak is not measured."""
    t = recipe.train
    rank, world, _ = world_from_env()
    recipe = resolve_dispatcher(recipe, world, log and rank == 0)  # dispatcher: auto -> a named one
    preflight(recipe)  # device, tokenizer and data files: before any process group or model
    check_pipeline(recipe.parallel, recipe.model, t.grad_accum)  # stages and micro-batches, no group yet
    runtime = init_distributed(recipe)  # validates the parallel layout before any process group
    device = resolve_device_type(t.device)
    peak = (device_peak(device, torch.bfloat16 if t.dtype == "bf16" else torch.float32) if measure_peak
            else Peak(float("nan"), "not measured"))
    seed_everything(t.seed)
    model = runtime.parallelize(build_model(recipe, device, runtime))
    runtime.attach_pipeline(model, t.grad_accum, t.micro_batch_size, t.seq_len)
    if log and getattr(runtime.layout, "pp", 1) > 1:
        _log_param_bytes(model, runtime)
    memory = apply_memory(model, recipe.memory, device)  # from outside the model, after sharding
    optimizer = runtime.wrap_optimizer(build_optimizer(model, t), model)
    if recipe.memory.optimizer_offload:  # after ZeRO-1: each rank offloads its own shard
        optimizer = offload_optimizer(optimizer, recipe.memory)
    placement, skew = apply_placement(recipe.placement, model, runtime)
    train_it, valid_it = build_data(recipe, rank=runtime.dp_rank, world=runtime.dp_size)
    return TrainingContext(recipe, runtime, device, peak, model, optimizer, train_it, valid_it,
                           log=log and runtime.is_main, memory=memory, placement=placement, skew=skew)
