"""Cross-micro-batch overlap (`parallel.fb_overlap`) without a pipeline: the forward of micro-batch
i + 1 runs while the backward of micro-batch i runs, so each one's exchanges hide behind the other's
compute. With pp > 1 the pipeline's steady state pairs them the same way (parallel/pipeline_overlap.py).

MindSpeed's fb-overlap and DualPipe pair a forward and a backward chunk and interleave their
pieces by hand at every exchange. Here the pairing is by threads: the main thread runs the forward,
a worker thread the backward (the autograd engine runs CPU work on the thread that calls it), and
whenever one waits for an exchange the other computes. Each thread issues its collectives on its own
lane of process groups (parallel/lanes.py), in program order, so the ranks stay in step without any
hand-made schedule, and recomputation or sequence parallelism in backward needs nothing special.

Order of a step with m micro-batches: F0, then (F1 | B0), (F2 | B1), ..., (F[m-1] | B[m-2]), B[m-1];
each pair joins before the next starts, so at most two micro-batches' activations are alive (as in
1F1B) and the gradients are accumulated in the same order as the plain loop: the numbers are those
of the plain loop (tests/test_fb_overlap.py). Every backward runs on the worker, so the backward
collectives (gradient buckets included) always use the backward lane. The loop itself is the
trainer's (launch/trainer/step.py `forward_backward`); `BackwardLane` replaces its `backward()`.

Not thread-safe, so refused with it (launch/trainer/recipe.py): recomputing a whole layer (it
re-runs the router, whose counters the concurrent forward updates). What both lanes touch is
guarded: the exposure ledger and link occupancy (parallel/emulated_links.py), the byte counters
(parallel/comm.py CommStats). On devices with streams each lane would want its own compute stream
as well; the CPU path needs none.
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Optional

import torch

from parallel import emulated_links, lanes


@contextlib.contextmanager
def on_worker() -> Iterator[None]:
    """What a backward on the worker thread runs inside: the backward lane's groups, counted as a
    running lane for the exposure metrics (parallel/emulated_links.py)."""
    with emulated_links.lane_running(), lanes.backward_lane():
        yield


class BackwardLane:
    """Runs each micro-batch's backward on a worker thread: `submit(loss)` waits for the previous
    backward, then starts this one and returns, so the caller's next forward runs beside it;
    `finish()` waits for the last. The trainer's micro-batch loop (launch/trainer/step.py) calls
    them in place of `loss.backward()`."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backward-lane")
        self.job: Optional[Future] = None
        self.submitted_at = 0.0
        self.concurrent_s = 0.0  # seconds a backward ran while this thread ran a forward (metrics)
        self.backwards = 0

    def submit(self, loss: torch.Tensor) -> None:
        self.finish()
        self.submitted_at = time.monotonic()
        self.job = self.pool.submit(self._run, loss)
        self.backwards += 1

    @staticmethod
    def _run(loss: torch.Tensor) -> float:
        with on_worker():
            loss.backward()
        return time.monotonic()

    def finish(self) -> None:
        """Wait for the running backward (re-raising its error)."""
        job, self.job = self.job, None
        if job is None:
            return
        joined = time.monotonic()
        with emulated_links.lane_idle():  # this thread only waits for the backward now
            ended = job.result()
        self.concurrent_s += max(0.0, min(joined, ended) - self.submitted_at)

    def take_metrics(self) -> dict:
        """Since the last call: backwards run on the lane, and seconds they ran beside a forward."""
        out = {"fb_overlap_backwards": self.backwards, "fb_overlap_concurrent_s": self.concurrent_s}
        self.backwards, self.concurrent_s = 0, 0.0
        return out

    def drain(self) -> None:
        """After an error in the forward: let a running backward end, keep the first error."""
        job, self.job = self.job, None
        if job is not None:
            job.exception()

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
