"""Pipeline schedules: 1F1B and interleaved 1F1B (virtual stages), in closed form and as an
event-level timeline that can be written as Chrome-trace JSON (open it in Perfetto).

Operation order on pipeline rank r of p, with v chunks per rank and m micro-batches (Megatron's):
- warm-up forwards: p - r - 1 for 1F1B; (p - r - 1) * 2 + (v - 1) * p for interleaved (capped at m*v);
- steady phase: one forward, one backward, alternating; then the cool-down backwards (with p = 1,
  the first forward counts as warm-up and the last backward as cool-down: they have no partner).
- The k-th forward on a rank runs chunk (k // p) % v of micro-batch (k // (p v)) p + k % p; the k-th
  backward runs chunk v - 1 - (k // p) % v of the same micro-batch formula.
Virtual stage c * p + r holds chunk c of rank r; a micro-batch flows through virtual stages 0..p v - 1
forwards, then back. Cross-rank hand-offs wait `p2p` seconds.

Closed form (exact for equal stages and p2p = 0, checked against the timeline in tests):
T = m * max_s W_s + (sum_s W_s - max_s W_s) / v, where W_s = F_s + B_s is the per-micro-batch work of
stage s. For equal stages the bubble is (p - 1) / v * W, i.e. a bubble fraction (p - 1) / (v m + p - 1).
Blocking hand-offs of p2p seconds add about 2 p2p to each W (within a few % of the timeline). When the
chunks of an interleaved schedule differ (embedding, output head, MTP), stalls propagate between
ranks and the closed form is optimistic; the timeline is the reference, and the search re-ranks its
best candidates with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def num_warmup(p: int, v: int, m: int, rank: int) -> int:
    if v == 1:
        return min(p - rank - 1, m)
    return min((p - rank - 1) * 2 + (v - 1) * p, m * v)


def forward_slot(k: int, p: int, v: int) -> tuple[int, int]:
    """(micro-batch, chunk) of the k-th forward on a rank."""
    return (k // (p * v)) * p + k % p, (k // p) % v


def backward_slot(k: int, p: int, v: int) -> tuple[int, int]:
    return (k // (p * v)) * p + k % p, v - 1 - (k // p) % v


def rank_ops(p: int, v: int, m: int, rank: int) -> list[tuple[str, int, int, str]]:
    """Ordered (kind 'F'/'B', micro-batch, chunk, phase) of one pipeline rank."""
    total = m * v
    warm = num_warmup(p, v, m, rank)
    ops = [("F", *forward_slot(k, p, v), "warmup") for k in range(warm)]
    f, b = warm, 0
    while f < total:
        ops.append(("F", *forward_slot(f, p, v), "steady"))
        ops.append(("B", *backward_slot(b, p, v), "steady"))
        f, b = f + 1, b + 1
    ops += [("B", *backward_slot(k, p, v), "cooldown") for k in range(b, total)]
    if p == 1 and len(ops) > 1:
        # without a pipeline, forward/backward overlap pairs each backward with the next forward
        # (parallel/fb_overlap.py): the first forward and the last backward have no partner
        ops[0], ops[-1] = (*ops[0][:3], "warmup"), (*ops[-1][:3], "cooldown")
    return ops


def in_flight_per_chunk(p: int, v: int, m: int, rank: int) -> list[int]:
    """Micro-batches whose activations a rank holds, per chunk, just after its first steady forward
    (the peak when chunks are alike): the first warm-up + 1 forwards of its order."""
    n = min(m * v, num_warmup(p, v, m, rank) + 1)
    cycles, rest = divmod(n, p * v)
    return [cycles * p + min(p, max(0, rest - c * p)) for c in range(v)]


def pipeline_time(work: list[float], m: int, v: int) -> float:
    """Closed-form makespan for per-stage, per-micro-batch work W_s (see module docstring)."""
    w_max = max(work)
    return m * w_max + (sum(work) - w_max) / v


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Idle share of the makespan for equal stages."""
    return (p - 1) / (v * m + p - 1)


@dataclass
class Event:
    name: str
    rank: int
    start: float
    dur: float
    cat: str  # forward | backward | comm | optimizer
    args: dict = field(default_factory=dict)


@dataclass
class Timeline:
    events: list[Event]
    makespan: float
    finish: list[float]  # per rank: end of its last backward
    peak_live: list[float]  # per rank: peak of the summed activation weights of live chunks

    def to_chrome_trace(self, path: str | Path, extra: list[Event] | None = None) -> Path:
        """Write Chrome-trace JSON: one process per pipeline rank, compute and communication threads."""
        out = []
        for e in self.events + (extra or []):
            tid = 1 if e.cat == "comm" else 0
            out.append({"name": e.name, "cat": e.cat, "ph": "X", "pid": e.rank, "tid": tid,
                        "ts": e.start * 1e6, "dur": max(e.dur, 0.0) * 1e6, "args": e.args})
        ranks = sorted({e.rank for e in self.events})
        for r in ranks:
            out.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"pipeline rank {r}"}})
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": "compute"}})
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": 1, "args": {"name": "exposed comm"}})
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
        return p


def simulate(p: int, v: int, m: int, fwd, bwd, p2p: float = 0.0, act=None, comm=None) -> Timeline:
    """Event-level timeline of the schedule (one loop over ranks and ops, about 60 lines: the
    dependency rules read together).

    fwd(rank, chunk, phase) and bwd(rank, chunk, phase) give op durations (phase lets forward/backward
    overlap hide communication only in the steady phase); act(rank, chunk) the activation weight a
    live micro-batch holds; comm(rank, chunk, kind, phase) the exposed-communication part of an op,
    drawn on its own track. Dependencies: F(mb, s) after F(mb, s-1), B(mb, s) after B(mb, s+1) and
    F(mb, s), plus `p2p` when consecutive virtual stages sit on different ranks.
    """
    n_stages = p * v
    orders = [rank_ops(p, v, m, r) for r in range(p)]
    f_done: dict[tuple[int, int], float] = {}
    b_done: dict[tuple[int, int], float] = {}
    pos = [0] * p
    free = [0.0] * p
    live = [0.0] * p
    peak = [0.0] * p
    events: list[Event] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                kind, mb, chunk, phase = orders[r][pos[r]]
                s = chunk * p + r
                if kind == "F":
                    if s == 0:
                        ready = 0.0
                    elif (mb, s - 1) in f_done:
                        ready = f_done[(mb, s - 1)] + (p2p if p > 1 else 0.0)
                    else:
                        break
                    dur = fwd(r, chunk, phase)
                else:
                    if s == n_stages - 1:
                        ready = f_done[(mb, s)]
                    elif (mb, s + 1) in b_done:
                        ready = b_done[(mb, s + 1)] + (p2p if p > 1 else 0.0)
                    else:
                        break
                    dur = bwd(r, chunk, phase)
                start = max(free[r], ready)
                free[r] = start + dur
                (f_done if kind == "F" else b_done)[(mb, s)] = free[r]
                w = act(r, chunk) if act else 1.0
                if kind == "F":
                    live[r] += w
                    peak[r] = max(peak[r], live[r])
                else:
                    live[r] -= w
                events.append(Event(f"{kind}{mb}.c{chunk}", r, start, dur,
                                    "forward" if kind == "F" else "backward",
                                    {"micro_batch": mb, "chunk": chunk, "phase": phase}))
                if comm:
                    exposed = comm(r, chunk, kind, phase)
                    if exposed > 0:
                        events.append(Event(f"exposed comm {kind}{mb}.c{chunk}", r,
                                            start + dur - exposed, exposed, "comm"))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked; this is a bug in the schedule order")
    return Timeline(events, max(free), list(free), peak)


BUSY_KINDS = ("compute", "recompute", "tp_comm", "ep_comm", "cp_comm", "swap")  # a rank's own work


def step_breakdown(chunks: list, pp: int, vpp: int, m: int, r: int, finish: float, dp: tuple,
                   step: float) -> dict:
    """Attribute the critical rank's step time: busy time by kind; the rest of the pipeline phase
    is bubble (fill/drain, stalls between unequal stages, hand-offs). Under fb overlap, EP exposure
    is apportioned by the micro-batches in the steady and warm-up/cool-down phases."""
    p, v = pp, vpp
    own = [chunks[c * p + r] for c in range(v)]
    compute = m * sum(c.f + c.b - c.rc for c in own)
    recompute = m * sum(c.rc for c in own)
    tp = m * sum(2 * c.tp + c.tp_fx + c.tp_bx for c in own)
    cp = m * sum(3 * c.cp for c in own)
    swap = m * sum(2 * c.swap for c in own)
    steady = max(0.0, m - num_warmup(p, v, m, r) / v)
    ep = sum(steady * (c.ep_f_st + c.ep_b_st) + (m - steady) * (c.ep_f + c.ep_b) for c in own)
    busy = compute + recompute + tp + cp + swap + ep
    grad, gather, opt = dp
    return {"compute": compute, "recompute": recompute, "tp_comm": tp, "ep_comm": ep, "cp_comm": cp,
            "swap": swap, "bubble": max(0.0, finish - busy), "dp_comm": grad + gather,
            "optimizer": opt, "total": step}
