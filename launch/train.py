"""The training entry point (`python -m launch.train --recipe R.yaml`, or under `torchrun`).

Loads and validates the recipe, builds the model, data and optimizer, and runs the loop: gradient
accumulation, clipping, AdamW with warm-up and cosine decay, aux-loss-free bias updates, and per-step
metrics (loss, balance loss, tokens/s, MFU, per-layer expert load imbalance) to a progress bar, a
JSONL file and TensorBoard.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import yaml

from launch.distributed import init_distributed, shutdown
from launch.metrics import MetricsLogger, imbalance, short_line
from launch.recipe import Recipe, TrainConfig, load_recipe
from launch.checkpoint import CheckpointError
from launch.resilience import Recovery, TrainingAborted
from moe.accounting import format_params, model_flops_per_token, param_counts
from config import ConfigError, parse_overrides, to_dict
from moe.model import MoETransformer
from parallel.device import device_peak, resolve_device_type


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


def build_model(recipe: Recipe, device: str = "cpu") -> MoETransformer:
    from kernels import get_kernels
    torch.manual_seed(recipe.train.seed)
    model = MoETransformer(recipe.model, get_kernels(recipe.train.kernels, device_type=device))
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
    from launch.data import BatchIterator, build_datasets, ensure_embedded_dataset
    from launch.tokenizer import load_tokenizer
    t, d = recipe.train, recipe.data
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {recipe.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; raise vocab_size to at least {tokenizer.vocab_size}")
    prefix = ensure_embedded_dataset(d.cache_dir, num_docs=d.embedded_docs) if d.path == "embedded" else d.path
    samples_per_step = t.micro_batch_size * t.grad_accum * world
    train_ds, valid_ds = build_datasets(
        prefix, t.seq_len, {"train": samples_per_step * t.steps, "valid": t.micro_batch_size * t.eval_batches * world},
        seed=t.seed, tokenizer=tokenizer, cache_dir=d.cache_dir)
    train_it = BatchIterator(train_ds, t.micro_batch_size, start_sample=start_sample, rank=rank, world=world)
    return train_it, (lambda: BatchIterator(valid_ds, t.micro_batch_size, rank=rank, world=world))


def _autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, batches: Iterator[dict], t: TrainConfig, device: str,
               grad_reducer=None, check_step=None) -> dict:
    """One optimizer step over `grad_accum` micro-batches. `grad_reducer` (set by `parallel/`)
    reduces gradients across data-parallel ranks and returns the global gradient norm.
    `check_step(loss, grad_norm)` (launch/resilience.py) may veto the update: the gradients are then
    dropped and weights, optimizer state and router biases stay unchanged."""
    model.train()
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0, "mtp_loss": 0.0}
    moe_layers = model.moe_layers()
    load = [torch.zeros_like(m.last_load) for m in moe_layers]
    for _ in range(t.grad_accum):
        batch = next(batches)
        with _autocast(device, t.dtype):
            out = model(batch["tokens"].to(device), batch["labels"].to(device),
                        batch.get("loss_mask").to(device) if batch.get("loss_mask") is not None else None)
        (out.loss / t.grad_accum).backward()
        for key in sums:
            sums[key] += float(getattr(out, key).detach()) / t.grad_accum
        for acc, m in zip(load, moe_layers):
            acc += m.last_load
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_reducer is not None:
        grad_norm = grad_reducer(params, t.grad_clip)
    elif t.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    skip = check_step(sums["loss"], grad_norm) if check_step is not None else None
    if skip is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if skip is None:
        model.update_expert_bias()
    else:  # the skipped step's routing counts must not steer the next bias update
        for m in moe_layers:
            m.router.load_since_update.zero_()
    sums["skipped"] = 0 if skip is None else 1
    imb = [imbalance(x) for x in load]
    sums.update(grad_norm=grad_norm, layer_imbalance=[x for x in imb if x is not None],
                expert_load=[x.tolist() for x in load])
    return sums


@torch.no_grad()
def evaluate(model, batches: Iterator[dict], n: int, t: TrainConfig, device: str) -> float:
    model.eval()
    losses = []
    for _, batch in zip(range(n), batches):
        with _autocast(device, t.dtype):
            out = model(batch["tokens"].to(device), batch["labels"].to(device))
        losses.append(float(out.lm_loss))
    model.train()
    return sum(losses) / max(1, len(losses))


def run(recipe: Recipe, progress: Optional[bool] = None, log: bool = True,
        stop_after: Optional[int] = None) -> list[dict]:
    """Train according to `recipe` on this process; return the per-step metrics of this run.

    Resumes from the newest checkpoint when there is one (recipe.checkpoint), saves every
    `checkpoint.interval` steps and at the end, skips non-finite or spiking steps
    (recipe.resilience), and on SIGTERM/SIGINT (or after `stop_after` steps) saves and returns.

    Under torchrun (WORLD_SIZE > 1) every rank builds the full model from the same seed, `parallel/`
    shards its experts and installs the dispatchers, each data-parallel rank reads its slice of the
    global batch, gradients are reduced by the runtime, and only rank 0 logs (global-batch losses)."""
    t = recipe.train
    rt = init_distributed(recipe)  # validates the parallel layout first; None for a single process
    device = resolve_device_type(t.device)
    # Measured before anything else starts: on CPU the peak is a timing, and start-up work
    # (dataset building, process groups) must not depress it.
    peak = device_peak(device, torch.bfloat16 if t.dtype == "bf16" else torch.float32)
    seed_everything(t.seed)
    model = build_model(recipe, device)
    if rt is not None:
        rt.parallelize(model)  # before the optimizer: expert parameters are replaced by their shards
    optimizer = build_optimizer(model, t)
    if rt is not None:
        optimizer = rt.wrap_optimizer(optimizer, model)
    dp_rank, dp, world = (rt.dp_rank, rt.dp_size, rt.layout.world) if rt is not None else (0, 1, 1)
    log = log and (rt is None or rt.is_main)
    train_it, valid_it = build_data(recipe, rank=dp_rank, world=dp)

    def eval_loss() -> float:
        loss = evaluate(model, valid_it(), t.eval_batches, t, device)
        if rt is None:
            return loss
        rt.stats.reset()  # evaluation traffic is not part of the next training step's metrics
        return rt.mean_over_dp({"eval": loss})["eval"]

    out_dir = Path(t.out_dir)
    counts = param_counts(recipe.model)
    flops_per_token = model_flops_per_token(recipe.model, t.seq_len)
    tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum * dp
    show = (t.progress if progress is None else progress) and (rt is None or rt.is_main)
    if log:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        print(f"model: {format_params(counts.total)} parameters, {format_params(counts.activated)} activated; "
              f"{flops_per_token / 1e6:.2f} MFLOP/token (train); device {device}; "
              f"peak {peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.source})", flush=True)

    recovery = Recovery(recipe, model, optimizer, train_it, rt, device, log=log, stop_after=stop_after)
    start_step = recovery.resume()
    logger = MetricsLogger(out_dir, tensorboard=t.tensorboard, enabled=log, resume_step=start_step)
    history: list[dict] = []
    bar = _progress(t.steps, show, initial=start_step)
    final_eval = None
    try:
        recovery.start()
        for step in range(start_step, t.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, t)
            start = time.perf_counter()
            m = train_step(model, optimizer, train_it, t, device,
                           grad_reducer=rt.grad_reducer if rt is not None else None,
                           check_step=lambda loss, norm: recovery.check(step + 1, loss, norm))
            elapsed = time.perf_counter() - start
            if rt is not None:  # global-batch losses, and bytes/tokens the dispatchers moved
                m.update(rt.mean_over_dp({k: m[k] for k in ("loss", "lm_loss", "aux_loss", "z_loss", "mtp_loss")}))
                m.update(rt.step_metrics())
            tok_s = tokens_per_step / elapsed
            layer_imb = m.pop("layer_imbalance")
            m.update(lr=lr_at(step, t), step_time_s=elapsed, tokens_per_s=tok_s,
                     mfu=flops_per_token * tok_s / (peak.flops_per_s * world),
                     max_imbalance=max(layer_imb) if layer_imb else 1.0, layer_imbalance=layer_imb)
            if t.eval_interval and (step + 1) % t.eval_interval == 0:
                m["eval_loss"] = eval_loss()
            history.append(m)
            if (step + 1) % t.log_interval == 0 or step + 1 == t.steps:
                logger.log(step + 1, {k: v for k, v in m.items() if k != "expert_load"})
            if bar is not None:
                bar.set_postfix_str(short_line(m), refresh=False)
                bar.update(1)
            if recovery.end_of_step(step + 1, tokens_per_step):
                break  # stop requested: the checkpoint is saved; skip the final evaluation
        else:
            recovery.finish(t.steps)
            final_eval = eval_loss() if history else None
    finally:
        recovery.close()
        if bar is not None:
            bar.close()
        logger.close()
    if final_eval is None:  # stopped early, or resumed a run that had already finished
        return history
    history[-1]["eval_loss"] = final_eval
    if log:
        _summarise(history, out_dir, peak)
    return history


def _progress(total: int, show: bool, initial: int = 0):
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
                mininterval=1.0)


def _summarise(history: list[dict], out_dir: Path, peak) -> None:
    first = history[0]["lm_loss"]
    tail = history[-min(10, len(history)):]
    last = sum(h["lm_loss"] for h in tail) / len(tail)
    summary = {
        "steps": len(history), "first_loss": first, "final_loss_mean_last10": last,
        "final_eval_loss": history[-1]["eval_loss"],
        "median_tokens_per_s": float(np.median([h["tokens_per_s"] for h in history])),
        "median_mfu": float(np.median([h["mfu"] for h in history])), "mfu_peak": peak.source,
        "mfu_peak_flops_per_s": peak.flops_per_s,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"loss: first step {first:.4f} -> last {len(tail)} steps mean {last:.4f} "
          f"(eval {summary['final_eval_loss']:.4f}); median {summary['median_tokens_per_s']:.0f} tokens/s, "
          f"MFU {100 * summary['median_mfu']:.1f}% of {peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.source})")
    print(f"metrics: {out_dir / 'metrics.jsonl'}, TensorBoard: {out_dir / 'tensorboard'}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ultramoe-train", description="Train an MoE model from a recipe YAML (also under torchrun).",
        epilog="Example: python -m launch.train --recipe configs/recipes/tiny_cpu.yaml train.steps=50")
    ap.add_argument("--recipe", required=True, help="recipe YAML (model, train, data, parallel sections)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-3")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    args = ap.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
        run(recipe, progress=not args.no_progress and None)
        shutdown()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
