"""Emulated links: make gloo on one CPU box behave like a cluster's fast and slow links, and time
every collective the runtime issues (hidden behind compute vs exposed).

Every collective of the runtime (token exchanges in comm.py, gradient reduction in
data_parallel.py, ZeRO-1's all-gather in zero.py, TP's in tp_comm.py, the pipeline schedules'
sends and receives through `patch_pipeline_p2p`) goes through the wrappers below. Under `parallel.emulate_links` a collective is issued asynchronously and its `wait()` returns
no earlier than issue time + the time its bytes take on the links: the real work is waited for,
then the thread *sleeps* to the deadline (no busy loop, so compute of other ranks sharing the
cores is not slowed). A collective waited for at once (synchronous) is charged in full; one
waited for later is hidden by whatever ran in between. Skew between ranks is not added on top of
the link time (a late peer shows up as real waiting in gloo anyway).

Link model: parallel/link_model.py, the one the simulator's predictions use (simulator/comm.py),
so a prediction and an emulated run describe the same cluster. This module only counts the bytes
of each real collective per link class, from the actual group members and their nodes:
- ring collectives (all-gather / reduce-scatter of a full buffer, all-reduce): at the inter-node
  link when the group spans nodes, else the intra-node one;
- all-to-all: bytes to peers on this node over the intra-node link, the rest over the inter-node
  link; with uneven splits the larger of what this rank sends and receives on each link class
  (full duplex links); the count exchange before a split exchange is one latency step;
- P2P: on the link between the two ranks.

Without emulation the wrappers still record each collective's timestamps (issue, wait, done) for
the step's exposure metrics; `install(None, ...)` keeps only that, `uninstall()` removes both.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch.distributed as dist

from parallel import lanes
from parallel import link_model as LM
from parallel.config import EmulateLinks

_LEDGER_LOCK = threading.Lock()
_SPLIT_STEPS = {"counts": 1}  # latency steps of an all-to-all kind other than ceil(log2 n)


@dataclass
class Exposure:
    """Seconds of communication in flight while other work ran (hidden) and while this rank waited
    for it (exposed), since the last `take`."""
    hidden_s: float = 0.0
    exposed_s: float = 0.0
    charged_s: float = 0.0  # emulated link time of the collectives (0 without emulation)
    count: int = 0
    by_kind: dict = field(default_factory=dict)  # kind -> [hidden_s, exposed_s]

    def add(self, kind: str, hidden: float, exposed: float, charged: float) -> None:
        with _LEDGER_LOCK:  # the backward lane (parallel/lanes.py) waits on its own thread
            self._add(kind, hidden, exposed, charged)

    def _add(self, kind: str, hidden: float, exposed: float, charged: float) -> None:
        self.hidden_s += hidden
        self.exposed_s += exposed
        self.charged_s += charged
        self.count += 1
        acc = self.by_kind.setdefault(kind, [0.0, 0.0])
        acc[0] += hidden
        acc[1] += exposed


@dataclass
class _State:
    links: Optional[EmulateLinks]
    node_of: Callable[[int], int]
    rank: int
    ledger: Exposure = field(default_factory=Exposure)
    busy_until: list = field(default_factory=lambda: [0.0, 0.0])  # per lane: its last collective's deadline

    def occupy(self, issued: float, charged: float) -> float:
        """The deadline of a collective issued now: the two lanes (parallel/lanes.py) share the links,
        so one issued while the other lane's is on the wire starts after it; collectives of one lane
        in flight together do not queue (as before lanes, and as the simulator costs them)."""
        lane = 1 if lanes.on_backward_lane() else 0
        with _LEDGER_LOCK:
            deadline = max(issued, self.busy_until[1 - lane]) + charged
            self.busy_until[lane] = max(self.busy_until[lane], deadline)
        return deadline


_state: Optional[_State] = None


def install(links: Optional[EmulateLinks], node_of: Callable[[int], int], rank: int) -> None:
    """Route this process's runtime collectives through the emulated links (`links` None: only
    time them). Replaces any earlier installation."""
    global _state
    _state = _State(links, node_of, rank)


def uninstall() -> None:
    global _state
    _state = None


def take_exposure() -> Optional[Exposure]:
    """This rank's exposure since the last call (None when nothing is installed), and reset."""
    if _state is None:
        return None
    out, _state.ledger = _state.ledger, Exposure()
    return out


# --- the link model --------------------------------------------------------------------------

_RANKS: dict = {}


def _ranks(group) -> tuple[int, ...]:
    key = group if group is not None else dist.group.WORLD
    if key not in _RANKS:
        _RANKS[key] = tuple(dist.get_process_group_ranks(key))
    return _RANKS[key]


def _spans(ranks, node_of) -> bool:
    return len({node_of(r) for r in ranks}) > 1


def ring_time(full_bytes: float, ranks, node_of, links: EmulateLinks, passes: int = 1) -> float:
    """All-gather / reduce-scatter (passes 1) or all-reduce (passes 2) of a full buffer."""
    spans = _spans(ranks, node_of)
    return LM.transfer_time(*LM.ring(full_bytes, len(ranks), spans, passes), spans, links.intra_node, links.inter_node)


def all_to_all_time(send_per_peer, recv_per_peer, ranks, me: int, node_of, links: EmulateLinks,
                    steps: Optional[int] = None) -> float:
    """Bytes this rank sends to / receives from each group member (group-rank order)."""
    n = len(ranks)
    if n <= 1:
        return 0.0
    mine = node_of(me)
    by_class = {True: [0.0, 0.0], False: [0.0, 0.0]}  # same node? -> [sent, received]
    for peer, s, r in zip(ranks, send_per_peer, recv_per_peer):
        if peer != me:
            acc = by_class[node_of(peer) == mine]
            acc[0] += s
            acc[1] += r
    steps = LM.all_to_all_steps(n) if steps is None else steps
    return LM.transfer_time(max(by_class[True]), max(by_class[False]), steps, _spans(ranks, node_of),
                            links.intra_node, links.inter_node)


def p2p_time(nbytes: float, a: int, b: int, node_of, links: EmulateLinks) -> float:
    crosses = node_of(a) != node_of(b)
    return LM.transfer_time(*LM.p2p(nbytes, crosses), crosses, links.intra_node, links.inter_node)


# --- delayed, timed work -----------------------------------------------------------------------

class _Stalls:
    """Seconds during which every running lane of this rank was blocked in a wait: the step's
    exposed communication. One lane (the usual case) is stalled whenever it waits; with
    cross-micro-batch overlap (parallel/fb_overlap.py) a backward lane runs beside the main one, and
    a wait hidden by the other lane's compute is not exposed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running, self.waiting = 1, 0
        self.total, self.since = 0.0, None
        self.lane_changes = 0

    def snapshot(self) -> tuple[Optional[int], float]:
        """(the lane-change count if this lane runs alone now, else None; stalled seconds so far)."""
        with self.lock:
            alone = self.lane_changes if self.running == 1 else None
            return alone, self.total + (time.monotonic() - self.since if self.since is not None else 0.0)

    def _change(self, d_running: int, d_waiting: int) -> None:
        with self.lock:
            self.lane_changes += d_running != 0
            now = time.monotonic()
            if self.since is not None:
                self.total += now - self.since
            self.running += d_running
            self.waiting += d_waiting
            self.since = now if self.waiting >= self.running > 0 else None


_stalls = _Stalls()


@contextlib.contextmanager
def lane_running() -> Iterator[None]:
    """A second lane (a backward on a worker thread, parallel/fb_overlap.py) runs beside this one."""
    _stalls._change(+1, 0)
    try:
        yield
    finally:
        _stalls._change(-1, 0)


@contextlib.contextmanager
def lane_idle() -> Iterator[None]:
    """This lane is blocked on something other than a collective (waiting for the other lane)."""
    _stalls._change(-1, 0)
    try:
        yield
    finally:
        _stalls._change(+1, 0)


class _Timed:
    """Wraps a gloo Work: `wait()` waits for it, sleeps to the emulated deadline, and records how
    long it was in flight while other work ran (hidden) and how long every lane of the rank was
    blocked while waiting for it (exposed)."""

    def __init__(self, work, kind: str, issued: float, charged: float, state: _State, on_arrival: bool = False):
        self.work, self.kind, self.issued, self.charged, self.state = work, kind, issued, charged, state
        self.deadline = issued + charged  # later when the links are busy with the other lane's work
        self.on_arrival = on_arrival  # a receive: the link time runs from when the message arrived
        self.done_at: Optional[float] = None  # when gloo really finished, where its future says
        self._waited = False
        try:
            work.get_future().then(self._mark_done)
        except RuntimeError:  # gloo's reduce-scatter has no future; the deadline stands in
            pass

    def _mark_done(self, _fut) -> None:
        self.done_at = time.monotonic()

    def wait(self, at_issue: bool = False) -> bool:
        if self._waited:
            return True
        self._waited = True
        start = self.issued if at_issue else time.monotonic()  # synchronous: nothing ran in between
        alone, stalled_before = _stalls.snapshot()
        _stalls._change(0, +1)
        try:
            self.work.wait()
            now = time.monotonic()
            deadline = (self.done_at or now) + self.charged if self.on_arrival else self.deadline
            if deadline > now:
                time.sleep(deadline - now)  # the emulated link is still busy: sleep, never spin
                now = time.monotonic()
        finally:
            _stalls._change(0, -1)
        done = max(deadline, self.done_at if self.done_at is not None else self.issued)
        hidden = max(0.0, min(start, done) - self.issued)
        if alone is not None and _stalls.snapshot()[0] == alone:  # one lane throughout: the wait blocked it all
            exposed = now - start
        else:  # another lane ran during the wait: exposed while every lane was blocked
            exposed = _stalls.snapshot()[1] - stalled_before
            hidden += max(0.0, min(now, done) - max(start, self.issued) - exposed)
        if self.state is _state:  # a run installed since then has its own ledger
            self.state.ledger.add(self.kind, hidden, exposed, self.charged)
        return True

    def is_completed(self) -> bool:
        return self._waited or (self.work.is_completed() and time.monotonic() >= self.deadline)


def _issue(kind: str, launch: Callable, cost: Callable[[_State], float], async_op: bool):
    state = _state
    if state is None:
        return launch(async_op)
    issued = time.monotonic()
    work = launch(True)
    charged = cost(state) if state.links is not None else 0.0
    timed = _Timed(work, kind, issued, charged, state)
    if charged > 0:
        timed.deadline = state.occupy(issued, charged)
    if async_op:
        return timed
    timed.wait(at_issue=True)
    return None


# --- the wrappers: dist's signatures, the runtime's collectives --------------------------------

# Newer torch renamed the single-tensor all-gather / reduce-scatter (the old names now warn); older
# torch (the project allows >= 2.6) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def all_to_all_single(out, inp, out_splits=None, in_splits=None, group=None, async_op=False, kind="all_to_all"):
    group = lanes.route(group)
    def cost(s: _State) -> float:
        ranks = _ranks(group)
        n = len(ranks)
        row_in = _nbytes(inp) / max(1, inp.shape[0]) if inp.dim() else _nbytes(inp)
        row_out = _nbytes(out) / max(1, out.shape[0]) if out.dim() else _nbytes(out)
        send = [r * row_in for r in in_splits] if in_splits else [_nbytes(inp) / n] * n
        recv = [r * row_out for r in out_splits] if out_splits else [_nbytes(out) / n] * n
        return all_to_all_time(send, recv, ranks, s.rank, s.node_of, s.links, _SPLIT_STEPS.get(kind))
    return _issue(kind, lambda a: dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=a),
                  cost, async_op)


def all_gather_single(out, inp, group=None, async_op=False):
    group = lanes.route(group)
    return _issue("all_gather", lambda a: _all_gather_single(out, inp, group=group, async_op=a),
                  lambda s: ring_time(_nbytes(out), _ranks(group), s.node_of, s.links), async_op)


def reduce_scatter_single(out, inp, group=None, async_op=False):
    group = lanes.route(group)
    return _issue("reduce_scatter", lambda a: _reduce_scatter_single(out, inp, group=group, async_op=a),
                  lambda s: ring_time(_nbytes(inp), _ranks(group), s.node_of, s.links), async_op)


def all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False, kind="all_reduce"):
    group = lanes.route(group)
    return _issue(kind, lambda a: dist.all_reduce(t, op=op, group=group, async_op=a),
                  lambda s: ring_time(_nbytes(t), _ranks(group), s.node_of, s.links, passes=2), async_op)


def send(t, group_dst: int, group):
    """Start sending `t` to group rank `group_dst` (a pipeline hand-off, parallel/pipeline_overlap.py).
    The sender is not held: the link time is charged where the message is received (`recv`)."""
    group = lanes.route(group)
    return _issue("p2p", lambda _a: dist.isend(t, group_dst=group_dst, group=group), lambda s: 0.0, True)


def recv(t, group_src: int, group):
    """Start receiving into `t` from group rank `group_src`; `wait()` returns the link time after the
    message arrived (the whole message crossing the link between the two ranks)."""
    group = lanes.route(group)
    state = _state
    if state is None:
        return dist.irecv(t, group_src=group_src, group=group)
    issued = time.monotonic()
    work = dist.irecv(t, group_src=group_src, group=group)
    peer = dist.get_global_rank(group, group_src)
    charged = p2p_time(_nbytes(t), state.rank, peer, state.node_of, state.links) if state.links is not None else 0.0
    return _Timed(work, "p2p", issued, charged, state, on_arrival=True)


def _timed_batch_p2p(original):
    """torch.distributed.pipelining's `_batch_p2p` (the schedules' one way to issue sends and
    receives), with the batch charged as P2P on the link to its slowest peer."""
    def batch_p2p(p2p_ops, desc=None):
        state, issued = _state, time.monotonic()
        works = original(p2p_ops, desc)
        if state is None or state.links is None or not works:
            return works
        per_peer: dict[int, int] = {}
        for op in p2p_ops:
            per_peer[op.peer] = per_peer.get(op.peer, 0) + _nbytes(op.tensor)
        charged = max(p2p_time(n, state.rank, peer, state.node_of, state.links) for peer, n in per_peer.items())
        # the schedule waits for every work of the batch: the last one carries the link time
        return [_Timed(w, "p2p", issued, charged if i == len(works) - 1 else 0.0, state) for i, w in enumerate(works)]
    batch_p2p.emulated = True
    return batch_p2p


def patch_pipeline_p2p() -> None:
    """Route the pipeline schedules' P2P through the emulated links (idempotent; call once the
    schedules are imported: `ParallelRuntime.attach_pipeline` does). Without emulation it passes
    the works through untouched."""
    from torch.distributed.pipelining import schedules
    if not getattr(schedules._batch_p2p, "emulated", False):
        schedules._batch_p2p = _timed_batch_p2p(schedules._batch_p2p)


def exposure_metrics(device: str = "cpu") -> dict:
    """The step's communication seconds hidden behind compute vs exposed (waited for), mean over
    ranks, and the hidden fraction; resets the ledger. A collective over the world (plain, not
    emulated): every rank must call it."""
    import torch
    mine = take_exposure() or Exposure()
    t = torch.tensor([mine.hidden_s, mine.exposed_s, mine.charged_s],
                     dtype=torch.float64 if device == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    hidden, exposed, charged = (float(v) / dist.get_world_size() for v in t.tolist())
    total = hidden + exposed
    out = {"comm_hidden_s": hidden, "comm_exposed_s": exposed, "comm_emulated_s": charged,
           "comm_hidden_fraction": hidden / total if total > 0 else 0.0}
    if charged > 0:  # in-flight time includes waiting for late peers; this counts link time only
        out["comm_link_hidden_fraction"] = max(0.0, 1.0 - exposed / charged)
    return out
