"""Failure handling inside the training loop: bad steps are skipped, signals end the run cleanly.

* `StepGuard` looks at each step's loss and gradient norm *before* the optimizer step. A non-finite
  value, or (when enabled) a loss spike, means the step is skipped: gradients are dropped and the
  weights, optimizer state and router biases stay as they were; the data position still advances,
  so a bad batch is not retried. Consecutive skips are counted and the run aborts with
  `TrainingAborted` after `max_nonfinite_in_row` (or `max_spikes_in_row`) of them: the problem is
  then not one bad batch. The spike detector compares the loss with the mean of the last
  `spike_window` accepted losses. Its window and counters go into checkpoints (`state_dict`), so a
  resumed run makes the same decisions as an uninterrupted one.
* `GracefulStop` turns SIGTERM / SIGINT into a request that the loop honours at the next step
  boundary (save a final checkpoint, exit 0). Ranks receive signals at different moments, so the
  decision is agreed over all ranks (`should_stop`, a one-element all-reduce); a second SIGINT
  while stopping raises KeyboardInterrupt as usual.

Under data parallelism pass the loss averaged over the data-parallel ranks (and the global
gradient norm, which the gradient reducer already returns): every rank then decides alike.

* `Recovery` is what the training loop (loop.py) calls: it bundles the two with the `Checkpointer` (resume at
  start, the per-step check, periodic / final / on-signal saves).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from config import to_dict
from launch.checkpoint.checkpointer import Checkpointer
from parallel.runtime import Runtime


class TrainingAborted(RuntimeError):
    """Too many bad steps in a row; the message says what happened and what to try."""


class StepGuard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.nonfinite_in_row = 0
        self.spikes_in_row = 0
        self.skipped_nonfinite = 0
        self.skipped_spikes = 0

    def check(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        """None to apply this step, or why it is skipped. Raises TrainingAborted after too many
        skips in a row. `step` is 1-based (the step being taken), for messages."""
        cfg = self.cfg
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.nonfinite_in_row += 1
            self.skipped_nonfinite += 1
            self.spikes_in_row = 0
            if self.nonfinite_in_row >= cfg.max_nonfinite_in_row:
                raise TrainingAborted(
                    f"step {step}: loss {loss}, gradient norm {grad_norm}: {self.nonfinite_in_row} non-finite steps "
                    f"in a row (resilience.max_nonfinite_in_row={cfg.max_nonfinite_in_row}). Lower train.lr, use "
                    "train.dtype fp32, or inspect the data at this position")
            return f"non-finite (loss {loss}, grad norm {grad_norm})"
        self.nonfinite_in_row = 0
        mean = self.recent_mean()
        if mean is not None and loss > cfg.spike_factor * mean:
            self.spikes_in_row += 1
            self.skipped_spikes += 1
            if self.spikes_in_row >= cfg.max_spikes_in_row:
                raise TrainingAborted(
                    f"step {step}: loss {loss:.4g} is {loss / mean:.1f}x the recent mean {mean:.4g}, "
                    f"{self.spikes_in_row} spikes in a row (resilience.max_spikes_in_row={cfg.max_spikes_in_row}); "
                    "lower train.lr or raise resilience.spike_factor")
            return f"loss spike ({loss:.4g} > {cfg.spike_factor} x recent mean {mean:.4g})"
        self.spikes_in_row = 0
        self.window.append(loss)
        return None

    def recent_mean(self) -> Optional[float]:
        """Mean of the accepted losses in the window, once the detector is armed (else None)."""
        if self.cfg.spike_factor <= 0 or len(self.window) < self.cfg.spike_min_history:
            return None
        return sum(self.window) / len(self.window)

    def counters(self) -> dict:
        return {"skipped_nonfinite": self.skipped_nonfinite, "skipped_spikes": self.skipped_spikes}

    def state_dict(self) -> dict:
        return {"window": list(self.window), "nonfinite_in_row": self.nonfinite_in_row,
                "spikes_in_row": self.spikes_in_row, **self.counters()}

    def load_state_dict(self, state: dict) -> None:
        self.window = deque((float(x) for x in state.get("window", [])), maxlen=self.cfg.spike_window)
        for key in ("nonfinite_in_row", "spikes_in_row", "skipped_nonfinite", "skipped_spikes"):
            setattr(self, key, int(state.get(key, 0)))


class GracefulStop:
    """Install with `with GracefulStop(): ...` (or install()/restore()); poll `should_stop()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: Optional[str] = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without the final checkpoint
        self.received = name
        print(f"\n{name} received: finishing this step, then saving a checkpoint and exiting "
              "(Ctrl-C again to abort without saving)", flush=True)

    def install(self) -> "GracefulStop":
        # Signal handlers can only be set from the main thread (tests may run the loop elsewhere).
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def request(self, reason: str) -> None:
        """Ask for a stop as a signal would (tests, time limits)."""
        self.received = reason

    def should_stop(self, device: str = "cpu", group=None) -> bool:
        """True on every rank if any rank received a signal (a collective when distributed; `device`
        is where the backend of `group` reduces: cpu for gloo, cuda/npu for nccl/hccl)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = bool(t.item() > 0)
            if flag and self.received is None:
                self.received = "a signal on another rank"
        return flag


class Recovery:
    """The training loop's one handle on checkpoints and failure handling: resume at start, check
    each step before the optimizer runs, save every `checkpoint.interval` steps, at the end and on
    SIGTERM/SIGINT. A collective: build it, and call its methods, on every rank."""

    def __init__(self, recipe, model, optimizer, train_it, runtime: Runtime, device: str = "cpu",
                 log: bool = True, stop_after: Optional[int] = None, placement=None):
        self.recipe, self.model, self.optimizer, self.train_it = recipe, model, optimizer, train_it
        self.placement = placement  # parallel/placement_runtime.ExpertPlacement: checkpointed in logical order
        self.runtime, self.device, self.stop_after = runtime, device, stop_after
        self.log = log
        root = recipe.checkpoint.dir or str(Path(recipe.train.out_dir) / "checkpoints")
        self.ckpt = Checkpointer(recipe.checkpoint, root, runtime=runtime, device=device, log=log)
        self.guard = StepGuard(recipe.resilience)
        self.stopper = GracefulStop(recipe.resilience.handle_signals)
        self.recipe_yaml = yaml.safe_dump(to_dict(recipe), sort_keys=False)
        self.tokens = 0
        self.saved_step: Optional[int] = None

    def _say(self, msg: str) -> None:
        if self.log:
            print(msg, flush=True)

    def resume(self) -> int:
        """Load the checkpoint `checkpoint.resume` asks for; return the step to start from."""
        info = self.ckpt.load(self.model, self.optimizer)
        if info is None:
            return 0
        if info.get("kind") == "weights":  # e.g. imported from Hugging Face: a fresh run
            self._say(f"initialised the weights from {self.ckpt.last_loaded}; training starts at step 0")
            return 0
        self.tokens = int(info.get("tokens", 0))
        if self.placement is not None and info.get("placement"):  # experts back to their saved slots
            self.placement.restore(info["placement"], self.optimizer)
        self.train_it.load_state_dict(info["data"])
        self.guard.load_state_dict(info.get("resilience", {}))
        self.saved_step = int(info["step"])
        if self.saved_step >= self.recipe.train.steps:
            self._say(f"the run is complete (step {self.saved_step}, train.steps={self.recipe.train.steps}); "
                      "raise train.steps to train further")
        if info.get("global_batch") not in (None, self._global_batch()):
            self._say(f"note: the global batch changed from {info['global_batch']} to {self._global_batch()} "
                      "samples; data continues from the saved position, the losses will differ from the old run's")
        elif info.get("micro_batch_size") not in (None, self.recipe.train.micro_batch_size):
            self._per_micro_batch_note(int(info["micro_batch_size"]))
        return self.saved_step

    def _per_micro_batch_note(self, old: int) -> None:
        """The global batch is kept but its micro-batches are not: say which losses then differ."""
        m = self.recipe.model
        parts = ([f"the balance loss (model.aux_loss_scope={m.aux_loss_scope})"]
                 if m.aux_loss_coeff > 0 and m.aux_loss_scope != "sequence" else [])
        parts += ["capacity dropping (model.capacity_factor)"] if m.capacity_factor is not None else []
        if parts:
            self._say(f"note: train.micro_batch_size changed from {old} to {self.recipe.train.micro_batch_size}: "
                      f"{' and '.join(parts)} {'depend' if len(parts) > 1 else 'depends'} on which samples share a micro-batch, so the losses differ "
                      "slightly from the old layout's; for identical losses keep micro_batch_size and change "
                      "grad_accum instead (docs/DESIGN-NOTES.md, 'Same losses after a reshard')")

    def _global_batch(self) -> int:
        t = self.recipe.train
        return t.micro_batch_size * t.grad_accum * self.runtime.dp_size

    def check(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        """Before the optimizer step: None to apply it, else why it is skipped (same on all ranks)."""
        loss = self.runtime.mean_over_dp({"loss": loss})["loss"]
        try:
            reason = self.guard.check(step, loss, grad_norm)
        except TrainingAborted as e:  # every rank aborts at the same step (same loss and norm)
            raise TrainingAborted(f"{e}. {self._save_last_good(step)}") from None
        if reason is not None:
            self._say(f"step {step}: skipped, {reason}; weights unchanged ({self.guard.counters()})")
        return reason

    def end_of_step(self, done: int, tokens: int) -> bool:
        """After step `done` (1-based): save if due; True when the loop must stop now."""
        self.tokens += tokens
        if self.stop_after is not None and done >= self.stop_after:
            self.stopper.request(f"stop_after={self.stop_after}")
        stop = self.stopper.should_stop(self.device)
        interval = self.recipe.checkpoint.interval
        if stop or (interval and done % interval == 0 and done < self.recipe.train.steps):
            self.save(done)
        if stop:
            self._say(f"stopped after step {done} ({self.stopper.received}); checkpoint {self.ckpt.root}; "
                      "run the same command again to resume")
        return stop

    def save(self, step: int, blocking: Optional[bool] = None) -> Optional[Path]:
        meta = {"tokens": self.tokens, "data": self.train_it.state_dict(), "resilience": self.guard.state_dict(),
                "global_batch": self._global_batch(), "micro_batch_size": self.recipe.train.micro_batch_size}
        if self.placement is None:
            path = self.ckpt.save(step, self.model, self.optimizer, meta, self.recipe_yaml, blocking=blocking)
        else:  # written in logical expert order (any EP size reads it); the tables go in meta.json
            with self.placement.canonical(self.optimizer) as placed:
                path = self.ckpt.save(step, self.model, self.optimizer, {**meta, "placement": placed},
                                      self.recipe_yaml, blocking=blocking)
        self.saved_step = step
        return path

    def _save_last_good(self, step: int) -> str:
        """Save at the aborting step; say where. Skipped steps leave weights, optimizer state and
        router biases untouched, so this is the state of the last applied step, with the data
        position past the bad batches, exactly what a periodic save at `step` would hold."""
        good = step - max(self.guard.nonfinite_in_row, self.guard.spikes_in_row)
        self.optimizer.zero_grad(set_to_none=True)  # the bad step's gradients are not state
        self.model.discard_pending_load()
        self.tokens += self._global_batch() * self.recipe.train.seq_len  # this step's batch was read
        try:
            path = self.save(step, blocking=True)
        except Exception as e:  # keep the abort's reason; add why nothing was saved
            return f"Saving the last good state failed too: {e}"
        weights = f"the weights of step {good}" if good > 0 else "the initial weights"
        return (f"The last good state ({weights}, data past the bad batches) is saved in {path}: "
                "run the same command again to resume from it")

    def finish(self, done: int) -> None:
        """At the end of training: the final checkpoint (if configured and not saved already)."""
        if self.recipe.checkpoint.save_at_end and self.saved_step != done:
            self.save(done)
        self.ckpt.wait()

    def start(self) -> None:
        """Install the signal handlers (call just before the loop)."""
        self.stopper.install()

    def close(self) -> None:
        """Restore the signal handlers and finish an async save in flight. Call it in a `finally`:
        while an exception propagates, a failure here is printed instead of replacing it."""
        self.stopper.restore()
        failing = sys.exc_info()[0] is not None
        try:
            self.ckpt.close()
        except Exception as e:
            if not failing:
                raise
            print(f"checkpoint: the save in flight failed too: {e}", file=sys.stderr, flush=True)
