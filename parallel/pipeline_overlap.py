"""Pipeline steps with cross-micro-batch overlap (`parallel.fb_overlap` with pp > 1, vpp = 1).

1F1B runs, in its steady phase, one forward and one backward of different micro-batches in turn;
with fb_overlap they run at once, so each one's expert exchanges hide behind the other's compute
(MindSpeed's fb-overlap, DualPipe's pairing). As at pp = 1 (parallel/fb_overlap.py) the pairing is
by threads: this thread runs the rank's forwards in micro-batch order, a worker thread its
backwards in micro-batch order, each issuing its collectives on its own lane of process groups
(parallel/lanes.py). The hand-offs follow the lanes too: activations go to the next stage on the
forward lane's pipeline group, gradients to the previous stage on the backward lane's, so each
link between two stages carries one thread's messages in one order, the same on both ends.

The schedule is 1F1B's dependency graph, not its fixed order: a forward waits for its input, a
backward for its own forward and the next stage's gradient, and a rank keeps at most p - r + 1
micro-batches in flight (1F1B keeps p - r; one more lets the last stage pair its forward of
micro-batch i + 1 with the backward of i). Backwards run in micro-batch order and gradients are
divided by the number of micro-batches once at the end, as the torch schedule does, so the
gradients are those of parallel/pipeline_schedule.py's 1F1B (tests/test_pipeline_overlap.py).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from parallel import emulated_links as links
from parallel import lanes


class _Abort(Exception):
    """The other lane failed: stop this one (the other's error is the one raised)."""


class OverlappedPipeline:
    def __init__(self, chunk, group, pp: int, micro_batches: int, act_shape: tuple, device, timers):
        """`chunk`: this rank's one stage (parallel/pipeline.py StageChunk); `timers`: the runner
        whose fwd_s / bwd_s / p2p_bytes it adds to."""
        self.chunk, self.group, self.pp, self.m = chunk, group, pp, micro_batches
        self.act_shape, self.device, self.timers = act_shape, device, timers
        self.rank = chunk.stage
        self.limit = min(micro_batches, pp - self.rank + 1)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-backward-lane")

    def _act(self) -> torch.Tensor:
        return torch.empty(self.act_shape, device=self.device)

    def step(self, mbs: list[dict], autocast) -> None:
        """Forward and backward of the step's micro-batches (`mbs`: tokens, labels, loss_mask)."""
        chunk, m = self.chunk, self.m
        slots = threading.Semaphore(self.limit)
        ready = [threading.Event() for _ in range(m)]
        saved: dict[int, tuple] = {}
        failed = threading.Event()
        sends: list = []
        job = self.pool.submit(self._backwards, saved, ready, slots, failed)
        try:
            with autocast:
                for j, mb in enumerate(mbs):
                    self._take_slot(slots, job)
                    if chunk.is_first:
                        x = mb["tokens"]
                    else:
                        x = self._act()
                        links.recv(x, self.rank - 1, self.group).wait()
                        x.requires_grad_()
                    start = time.perf_counter()
                    out = chunk(x, mb["tokens"], mb["labels"], mb.get("loss_mask"))
                    self.timers.fwd_s[0] += time.perf_counter() - start
                    if not chunk.is_last:
                        sent = out.detach()
                        sends.append((links.send(sent, self.rank + 1, self.group), sent))
                    saved[j] = (x, out)
                    ready[j].set()
        except BaseException:
            failed.set()
            for e in ready:
                e.set()
            job.exception()
            raise
        links.lane_stopped()  # only waiting for the backward lane now
        try:
            sends += job.result()
        finally:
            links.lane_started()
        for work, t in sends:
            work.wait()
            self.timers.p2p_bytes += t.numel() * t.element_size()
        for p in chunk.parameters():  # the mean over micro-batches, as torch's schedules scale
            if p.grad is not None:
                p.grad.div_(m)

    @staticmethod
    def _take_slot(slots: threading.Semaphore, job) -> None:
        """Wait for room for one more micro-batch in flight (this lane is not running meanwhile, for
        the exposure metrics); raise the backward lane's error if it failed."""
        if slots.acquire(blocking=False):
            return
        links.lane_stopped()
        try:
            while not slots.acquire(timeout=0.05):
                if job.done():
                    job.result()  # raises the backward lane's error
                    raise RuntimeError("pipeline backward lane ended early")
        finally:
            links.lane_started()

    def _backwards(self, saved, ready, slots, failed) -> list:
        chunk = self.chunk
        sends = []
        links.lane_started()
        try:
            with lanes.backward_lane():
                for j in range(self.m):
                    if not ready[j].is_set():
                        links.lane_stopped()
                        ready[j].wait()
                        links.lane_started()
                    if failed.is_set():
                        raise _Abort()
                    x, out = saved.pop(j)
                    grad = None
                    if not chunk.is_last:
                        grad = self._act()
                        links.recv(grad, self.rank + 1, self.group).wait()
                    start = time.perf_counter()
                    torch.autograd.backward(out, grad)  # the last stage's out is the loss
                    self.timers.bwd_s[0] += time.perf_counter() - start
                    del out
                    if not chunk.is_first:
                        sends.append((links.send(x.grad, self.rank - 1, self.group), x.grad))
                    del x
                    slots.release()
        finally:
            links.lane_stopped()
        return sends

    def close(self) -> None:
        self.pool.shutdown(wait=True)
