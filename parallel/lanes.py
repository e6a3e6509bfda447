"""Two lanes of collectives per rank, so a forward and a backward can run at once on two threads.

Cross-micro-batch overlap (parallel/fb_overlap.py) runs one micro-batch's backward on a worker
thread while the main thread runs the next micro-batch's forward. Both issue collectives on the
same logical groups (EP, TP, DP...), and a process group requires every member to issue its
collectives in the same order: two threads sharing one group would interleave differently on each
rank. So every group gets a twin with the same members, created once at set-up (`build_twins`,
collective), and a thread marked as the backward lane (`backward_lane()`) issues on the twins.
Within a lane the order is the program order, the same on every rank, as without overlap.

`route(group)` is the one switch: the runtime's collective wrappers (parallel/emulated_links.py)
and the routers' statistics reducers call it. Without twins, or on the main thread, it returns
the group unchanged. A backward-lane collective on a group with no twin is a bug in this file's
caller and raises rather than risk a deadlock.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

_local = threading.local()
_twins: dict = {}  # group (None: the world) -> its twin on the backward lane
backward_collectives = 0  # collectives issued on the backward lane so far (tests, metrics)


def _key(group) -> object:
    return dist.group.WORLD if group is None else group


def _mesh_twins(mesh: DeviceMesh) -> None:
    """A twin for every group of every dim of `mesh`: each rank creates every slice's group, in the
    same order, and keeps its own slice's."""
    grid = mesh.mesh
    me = dist.get_rank()
    for dim, name in enumerate(mesh.mesh_dim_names):
        rows = grid.movedim(dim, -1).reshape(-1, grid.shape[dim]).tolist()
        mine = mesh.get_group(name)
        for ranks in rows:
            twin = dist.new_group(ranks)  # collective over the world, members or not
            if me in ranks:
                _twins[_key(mine)] = twin


def build_twins(meshes) -> None:
    """Create the backward lane's groups for every group of `meshes` (parallel/mesh.py's `Meshes`)
    and for the world. Collective: every rank calls it, after `Meshes.build`. Runtimes built one
    after another in a process (benchmarks taking turns) keep their twins: torch's meshes hand out
    the same groups for the same layout, and a rebuilt twin replaces the old one."""
    for mesh in (meshes.dense, meshes.expert, meshes.expert_nodes):
        if mesh is not None:
            _mesh_twins(mesh)
    _twins[_key(None)] = dist.new_group(list(range(dist.get_world_size())))
    # pp > 2's embedding groups have no twin: the embedding gradient is summed after backward, on
    # the main thread


def on_backward_lane() -> bool:
    return getattr(_local, "backward", False)


@contextlib.contextmanager
def backward_lane() -> Iterator[None]:
    """Collectives this thread issues inside go to the twin groups."""
    before = on_backward_lane()
    _local.backward = True
    try:
        yield
    finally:
        _local.backward = before


def route(group: Optional[dist.ProcessGroup]):
    """The group this thread must issue a collective on (`group`'s twin on the backward lane)."""
    global backward_collectives
    if not on_backward_lane():
        return group
    backward_collectives += 1  # only the one backward thread writes it
    twin = _twins.get(_key(group))
    if twin is None:
        raise RuntimeError("a collective on the backward lane has no twin group (parallel/lanes.py build_twins "
                           f"did not see it): group ranks {dist.get_process_group_ranks(_key(group))}")
    return twin
