"""The link model: how long a collective's bytes take on a cluster's links. Defined once here and
used by the simulator (simulator/comm.py, for its predictions) and by the emulated links
(parallel/emulated_links.py, which delay gloo collectives on one CPU box to these times), so a
prediction and an emulated run describe the same cluster. It lives in `parallel/` because the
runtime may not import the simulator; the simulator may import `parallel`.

A link is anything with `bandwidth_gbps` (per device, one direction, GB/s) and `latency_us` (per
latency-bound step): the simulator's `hardware.Link` and the runtime's `config.LinkSpec` both are.

- A collective moves `intra` bytes per device over the intra-node link and `inter` bytes over the
  inter-node link, both at once, in `steps` latency-bound steps; a group spanning nodes pays the
  inter-node latency per step. Time = max(intra / bw_intra, inter / bw_inter) + steps * latency.
- Ring all-gather / reduce-scatter of a full buffer of S bytes over n ranks: (n-1)/n * S in n-1
  steps; all-reduce (passes 2) twice that. A ring spanning nodes runs at the inter-node link.
- All-to-all: the messages are concurrent, so ceil(log2 n) latency steps, not n - 1.
- Where a profile measured one kind of collective on one box (`single_link_time`): bytes at its
  bandwidth plus steps at its latency.

The floating-point order of each formula is the simulator's since its first version: changing it
changes the simulator's estimates in the last bits.
"""
from __future__ import annotations

import math


def transfer_time(intra_bytes: float, inter_bytes: float, steps: int, spans_nodes: bool, intra, inter) -> float:
    """Seconds for bytes sent per device on each link class, concurrently, plus the latency steps."""
    lat = (inter if spans_nodes else intra).latency_us * 1e-6
    return max(intra_bytes / (intra.bandwidth_gbps * 1e9), inter_bytes / (inter.bandwidth_gbps * 1e9)) + steps * lat


def single_link_time(nbytes: float, steps: int, bandwidth_gbps: float, latency_us: float) -> float:
    """Seconds on one measured link (a calibrated profile's per-collective bandwidth and latency)."""
    return nbytes / (bandwidth_gbps * 1e9) + steps * latency_us * 1e-6


def ring(full_bytes: float, n: int, spans_nodes: bool, passes: int = 1) -> tuple[float, float, int]:
    """(intra bytes, inter bytes, steps) one device sends in a ring collective of a full buffer:
    passes 1 for all-gather / reduce-scatter, 2 for all-reduce. Nothing for one rank or no bytes."""
    if n <= 1 or full_bytes <= 0:
        return 0.0, 0.0, 0
    sent = passes * (n - 1) / n * full_bytes
    return (0.0 if spans_nodes else sent), (sent if spans_nodes else 0.0), passes * (n - 1)


def all_to_all_steps(n: int) -> int:
    """Latency-bound steps of an all-to-all over n ranks (concurrent messages)."""
    return max(1, math.ceil(math.log2(n)))


def p2p(nbytes: float, crosses_nodes: bool) -> tuple[float, float, int]:
    """(intra bytes, inter bytes, steps) of one point-to-point message."""
    if nbytes <= 0:
        return 0.0, 0.0, 0
    return (0.0 if crosses_nodes else nbytes), (nbytes if crosses_nodes else 0.0), 1
