"""Pipeline steps with cross-micro-batch overlap (`parallel.fb_overlap` with pp > 1).

1F1B runs, in its steady phase, one forward and one backward of different micro-batches in turn;
with fb_overlap they run at once, so each one's expert exchanges hide behind the other's compute
(MindSpeed's fb-overlap, DualPipe's pairing). As at pp = 1 (parallel/fb_overlap.py) the pairing is
by threads: this thread runs the rank's forwards in micro-batch order, a worker thread its
backwards in micro-batch order, each issuing its collectives on its own lane of process groups
(parallel/lanes.py). The hand-offs follow the lanes too: activations go to the next stage on the
forward lane's pipeline group, gradients to the previous stage on the backward lane's, so each
link between two stages carries one thread's messages in one order, the same on both ends.

The schedule is (interleaved) 1F1B's dependency graph, not its fixed order: each lane takes its
(micro-batch, chunk) pieces in Megatron's order, a forward waits for its input, a backward for its
own forward and the next stage's gradient, and a rank keeps at most one micro-batch more in flight
than 1F1B does (p - r + 1 with one chunk per rank), so that the last stage can pair the forward of
micro-batch i + 1 with the backward of i. Every rank orders its pieces alike, so the messages of
each link leave and arrive in one order (with vpp > 1 the last rank's chunk c feeds the first
rank's chunk c + 1 over the same link). Gradients are divided by the number of micro-batches once
at the end, as torch's schedules do, so the numbers are those of parallel/pipeline_schedule.py's
schedules (tests/test_pipeline.py).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from parallel import emulated_links as links
from parallel.fb_overlap import on_worker


class _Abort(Exception):
    """The other lane failed: stop this one (the other's error is the one raised)."""


def forward_order(p: int, v: int, m: int) -> list[tuple[int, int]]:
    """(micro-batch, chunk) of a rank's forwards in order: Megatron's interleaved order, groups of
    p micro-batches through each chunk in turn (v = 1: the micro-batches in order). Every rank uses
    the same order, so each link's messages leave and arrive in one order."""
    return [((k // (p * v)) * p + k % p, (k // p) % v) for k in range(m * v)]


def backward_order(p: int, v: int, m: int) -> list[tuple[int, int]]:
    return [((k // (p * v)) * p + k % p, v - 1 - (k // p) % v) for k in range(m * v)]


def in_flight_limit(p: int, v: int, m: int, rank: int) -> int:
    """Forwards a rank may have run ahead of its backwards: 1F1B's warm-up plus its first steady
    forward (Megatron's count), plus one so that a forward can run beside the backward before it."""
    warm = p - rank - 1 if v == 1 else (p - rank - 1) * 2 + (v - 1) * p
    return min(m * v, warm + 2)


class OverlappedPipeline:
    def __init__(self, model, group, pp: int, micro_batches: int, act_shape: tuple, device, timers):
        """`model`: this rank's stages (parallel/pipeline.py PipelineModel, chunks in stage order);
        `timers`: the runner whose fwd_s / bwd_s / p2p_bytes it adds to (per chunk)."""
        self.model, self.chunks, self.group, self.pp, self.m = model, model.chunks, group, pp, micro_batches
        self.act_shape, self.device, self.timers = act_shape, device, timers
        v = len(self.chunks)
        self.rank = self.chunks[0].stage
        self.forwards = forward_order(pp, v, micro_batches)
        self.backwards = backward_order(pp, v, micro_batches)
        self.limit = in_flight_limit(pp, v, micro_batches, self.rank)
        self.prev, self.next = (self.rank - 1) % pp, (self.rank + 1) % pp
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-backward-lane")

    def _act(self) -> torch.Tensor:
        return torch.empty(self.act_shape, device=self.device)

    def step(self, mbs: list[dict], autocast) -> None:
        """Forward and backward of the step's micro-batches (`mbs`: tokens, labels, loss_mask)."""
        slots = threading.Semaphore(self.limit)
        ready = {key: threading.Event() for key in self.forwards}
        saved: dict[tuple, tuple] = {}
        failed = threading.Event()
        sends: list = []
        job = self.pool.submit(self._backwards, saved, ready, slots, failed)
        try:
            with autocast:
                for key in self.forwards:
                    j, c = key
                    chunk, mb = self.chunks[c], mbs[j]
                    self._take_slot(slots, job)
                    if chunk.is_first:
                        x = mb["tokens"]
                    else:
                        x = self._act()
                        links.recv(x, self.prev, self.group).wait()
                        x.requires_grad_()
                    start = time.perf_counter()
                    out = chunk(x, mb["tokens"], mb["labels"], mb.get("loss_mask"))
                    self.timers.fwd_s[c] += time.perf_counter() - start
                    if not chunk.is_last:
                        sent = out.detach()
                        sends.append((links.send(sent, self.next, self.group), sent))
                    saved[key] = (x, out)
                    ready[key].set()
        except BaseException:
            failed.set()
            for e in ready.values():
                e.set()
            job.exception()
            raise
        with links.lane_idle():  # only waiting for the backward lane now
            sends += job.result()
        for work, t in sends:
            work.wait()
            self.timers.p2p_bytes += t.numel() * t.element_size()
        for p in self.model.parameters():  # the mean over micro-batches, as torch's schedules scale
            if p.grad is not None:
                p.grad.div_(self.m)

    @staticmethod
    def _take_slot(slots: threading.Semaphore, job) -> None:
        """Wait for room for one more micro-batch in flight (this lane is not running meanwhile, for
        the exposure metrics); raise the backward lane's error if it failed."""
        if slots.acquire(blocking=False):
            return
        with links.lane_idle():
            while not slots.acquire(timeout=0.05):
                if job.done():
                    job.result()  # raises the backward lane's error
                    raise RuntimeError("pipeline backward lane ended early")

    def _backwards(self, saved, ready, slots, failed) -> list:
        sends = []
        with on_worker():
            for key in self.backwards:
                chunk = self.chunks[key[1]]
                if not ready[key].is_set():
                    with links.lane_idle():
                        ready[key].wait()
                if failed.is_set():
                    raise _Abort()
                x, out = saved.pop(key)
                grad = None
                if not chunk.is_last:
                    grad = self._act()
                    links.recv(grad, self.next, self.group).wait()
                start = time.perf_counter()
                torch.autograd.backward(out, grad)  # the last stage's out is the loss
                self.timers.bwd_s[key[1]] += time.perf_counter() - start
                del out
                if not chunk.is_first:
                    sends.append((links.send(x.grad, self.prev, self.group), x.grad))
                del x
                slots.release()
        return sends

    def close(self) -> None:
        self.pool.shutdown(wait=True)
