"""One optimizer step, evaluation and the learning-rate schedule: the pieces of the training loop
that touch the model. `TrainingContext.train_step` (setup.py) calls them with its runtime's hooks."""
from __future__ import annotations

import contextlib
import math
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from launch.trainer.metrics import imbalance
from launch.trainer.recipe import TrainConfig
from parallel.data_parallel import local_grad_norm

LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "mtp_loss")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(model, batches: Iterator[dict], t: TrainConfig, device: str,
                     backward_lane=None) -> tuple[dict, list]:
    """The single-process micro-batch loop: forward and backward of `grad_accum` micro-batches,
    gradients accumulated as for their mean loss. Returns the loss terms (means over the
    micro-batches) and each MoE layer's routing load summed over them. `backward_lane`
    (parallel/fb_overlap.py, with parallel.fb_overlap) runs each backward beside the next forward."""
    model.train()
    sums = dict.fromkeys(LOSS_KEYS, 0.0)
    moe_layers = model.moe_layers()
    load = [torch.zeros_like(m.routing_load()) for m in moe_layers]
    try:
        for _ in range(t.grad_accum):
            batch = next(batches)
            with autocast(device, t.dtype):
                out = model(batch["tokens"].to(device), batch["labels"].to(device),
                            batch.get("loss_mask").to(device) if batch.get("loss_mask") is not None else None)
            for acc, m in zip(load, moe_layers):  # before the backward: recomputation may re-route
                acc += m.routing_load()
            if backward_lane is None:
                (out.loss / t.grad_accum).backward()
            else:
                backward_lane.submit(out.loss / t.grad_accum)
            for key in sums:
                sums[key] += float(getattr(out, key).detach()) / t.grad_accum
            del out
        if backward_lane is not None:
            backward_lane.finish()
    finally:
        if backward_lane is not None:
            backward_lane.drain()
    return sums, load


def train_step(model, optimizer, batches: Iterator[dict], t: TrainConfig, device: str,
               grad_reducer: Callable[..., float] = local_grad_norm,
               check_step: Optional[Callable[[float, float], Optional[str]]] = None,
               pipeline: Optional[Callable] = None, backward_lane=None) -> dict:
    """One optimizer step over `grad_accum` micro-batches. `grad_reducer(params, max_norm)` (the
    runtime's: `parallel/`) reduces gradients across data-parallel ranks, clips them and returns the
    global gradient norm. `check_step(loss, grad_norm)` (resilience.py) may veto the update: the
    gradients are then dropped and weights, optimizer state and router biases stay unchanged.
    `pipeline(batches, grad_accum, device, autocast)` (the runtime's pipeline schedule, when pp > 1)
    replaces the single-process micro-batch loop and returns the same (loss terms, load);
    `backward_lane` (the runtime's, with parallel.fb_overlap) overlaps that loop's micro-batches."""
    if pipeline is None:
        sums, load = forward_backward(model, batches, t, device, backward_lane)
    else:
        sums, load = pipeline(batches, t.grad_accum, device, autocast(device, t.dtype))
    grad_norm = grad_reducer([p for p in model.parameters() if p.grad is not None], t.grad_clip)
    skip = check_step(sums["loss"], grad_norm) if check_step is not None else None
    if skip is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if skip is None:
        model.update_expert_bias()
    else:  # the skipped step's routing counts must not steer the next bias update
        model.discard_pending_load()
    sums["skipped"] = 0 if skip is None else 1
    imb = [imbalance(x) for x in load]
    sums.update(grad_norm=grad_norm, layer_imbalance=[x for x in imb if x is not None],
                expert_load=[x.tolist() for x in load])
    return sums


@torch.no_grad()
def evaluate(model, batches: Iterator[dict], n: int, t: TrainConfig, device: str,
             pipeline_lm_loss: Optional[Callable] = None) -> float:
    """Mean LM loss over `n` batches; `pipeline_lm_loss(batch, device)` (the runtime's, when
    pp > 1) runs one batch through the pipeline stages."""
    model.eval()
    losses = []
    for _, batch in zip(range(n), batches):
        with autocast(device, t.dtype):
            if pipeline_lm_loss is not None:
                losses.append(pipeline_lm_loss(batch, device))
                continue
            out = model(batch["tokens"].to(device), batch["labels"].to(device))
        losses.append(float(out.lm_loss))
    model.train()
    return sum(losses) / max(1, len(losses))
