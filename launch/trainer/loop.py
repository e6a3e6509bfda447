"""The training loop: `run(recipe)` sets up (setup.build_context), resumes, trains `train.steps`
steps with per-step metrics to a progress bar, a JSONL file and TensorBoard, evaluates, saves
checkpoints and summarises. Failure handling and checkpoints go through resilience.Recovery."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from config import to_dict
from launch.trainer.metrics import MetricsLogger, short_line
from launch.trainer.recipe import Recipe
from launch.trainer.resilience import Recovery
from launch.trainer.rundir import claims_run_dirs
from launch.trainer.setup import TrainingContext, build_context
from launch.trainer.step import lr_at
from moe.accounting import format_params, param_counts
from moe.mfu_conventions import mfu_by_convention


@claims_run_dirs  # writable dirs and one run at a time, checked before the model is built
def run(recipe: Recipe, progress: Optional[bool] = None, log: bool = True,
        stop_after: Optional[int] = None) -> list[dict]:
    """Train according to `recipe` on this process; return the per-step metrics of this run.

    Resumes from the newest checkpoint when there is one (recipe.checkpoint), saves every
    `checkpoint.interval` steps and at the end, skips non-finite or spiking steps
    (recipe.resilience), and on SIGTERM/SIGINT (or after `stop_after` steps) saves and returns.
    Under torchrun every rank runs it; only rank 0 logs (global-batch losses)."""
    t = recipe.train
    ctx = build_context(recipe, log=log)
    out_dir = Path(t.out_dir)
    if ctx.log:
        _announce(ctx, out_dir)
    # ctx.recipe: dispatcher 'auto' resolved, so a checkpoint's recipe.yaml names what ran
    recovery = Recovery(ctx.recipe, ctx.model, ctx.optimizer, ctx.train_it, ctx.runtime, ctx.device,
                        log=ctx.log, stop_after=stop_after, placement=ctx.placement)
    start_step = recovery.resume()
    logger = MetricsLogger(out_dir, tensorboard=t.tensorboard, enabled=ctx.log, resume_step=start_step)
    bar = _progress(t.steps, (t.progress if progress is None else progress) and ctx.runtime.is_main,
                    initial=start_step)
    history: list[dict] = []
    try:
        recovery.start()
        final_eval = _train(ctx, recovery, logger, bar, start_step, history)
    finally:
        recovery.close()
        if bar is not None:
            bar.close()
        logger.close()
    if final_eval is None:  # stopped early, or resumed a run that had already finished
        return history
    history[-1]["eval_loss"] = final_eval
    if ctx.log:
        _summarise(history, out_dir, ctx)
    return history


def _train(ctx: TrainingContext, recovery: Recovery, logger: MetricsLogger, bar, start_step: int,
           history: list[dict]) -> Optional[float]:
    """Steps `start_step` .. train.steps, appending each step's metrics to `history`; the final
    evaluation loss, or None when a stop was requested (the checkpoint is then saved)."""
    t = ctx.recipe.train
    for step in range(start_step, t.steps):
        start = time.perf_counter()
        m = ctx.train_step(step, check_step=lambda loss, norm: recovery.check(step + 1, loss, norm))
        elapsed = time.perf_counter() - start
        m = _step_metrics(ctx, step, ctx.global_metrics(m), elapsed)
        if t.eval_interval and (step + 1) % t.eval_interval == 0:
            m["eval_loss"] = ctx.eval_loss()
        history.append(m)
        if (step + 1) % t.log_interval == 0 or step + 1 == t.steps:
            logger.log(step + 1, {k: v for k, v in m.items() if k != "expert_load"})
        if bar is not None:
            bar.set_postfix_str(short_line(m), refresh=False)
            bar.update(1)
        if recovery.end_of_step(step + 1, ctx.tokens_per_step):
            return None  # stop requested: the checkpoint is saved; skip the final evaluation
    recovery.finish(t.steps)
    return ctx.eval_loss() if history else None


def _step_metrics(ctx: TrainingContext, step: int, m: dict, elapsed: float) -> dict:
    """Add the learning rate, timing, throughput, MFU and load-imbalance figures to `m`."""
    tok_s = ctx.tokens_per_step / elapsed
    layer_imb = m.pop("layer_imbalance")
    m.update(lr=lr_at(step, ctx.recipe.train), step_time_s=elapsed, tokens_per_s=tok_s,
             mfu=ctx.flops_per_token * tok_s / (ctx.peak.flops_per_s * ctx.runtime.layout.world),
             max_imbalance=max(layer_imb) if layer_imb else 1.0, layer_imbalance=layer_imb)
    return m


def _announce(ctx: TrainingContext, out_dir: Path) -> None:
    """Write the recipe beside the metrics and print the model's size and the MFU denominator."""
    recipe = ctx.recipe
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    counts, peak = param_counts(recipe.model), ctx.peak
    print(f"model: {format_params(counts.total)} parameters, {format_params(counts.activated)} activated; "
          f"{ctx.flops_per_token / 1e6:.2f} MFLOP/token (train); device {ctx.device}; "
          f"peak {peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.source})", flush=True)


def _progress(total: int, show: bool, initial: int = 0):
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
                mininterval=1.0)


def _summarise(history: list[dict], out_dir: Path, ctx: TrainingContext) -> None:
    peak = ctx.peak
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
    # the same median throughput under each published FLOP convention, to compare with papers
    tok_s, world = summary["median_tokens_per_s"], ctx.runtime.layout.world
    summary["tokens_per_s_per_device"] = tok_s / world
    summary["median_mfu_by_convention"] = mfu_by_convention(
        ctx.recipe.model, ctx.recipe.train.seq_len, tok_s, peak.flops_per_s, world)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"loss: first step {first:.4f} -> last {len(tail)} steps mean {last:.4f} "
          f"(eval {summary['final_eval_loss']:.4f}); median {summary['median_tokens_per_s']:.0f} tokens/s, "
          f"MFU {100 * summary['median_mfu']:.1f}% of {peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.source}; "
          + ", ".join(f"{c} {100 * v:.1f}%" for c, v in summary["median_mfu_by_convention"].items()) + ")")
    print(f"metrics: {out_dir / 'metrics.jsonl'}, TensorBoard: {out_dir / 'tensorboard'}")
