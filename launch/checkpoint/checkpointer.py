"""Training checkpoints on disk: written atomically, verified on load, kept in rotation, resumable
under any parallel layout. `state.py` (beside this file) says what goes in, `files.py` the on-disk
format, `resume.py` which checkpoint a run resumes from, `diagnose.py` how a failure is told; this
file drives saving and loading.

Directory layout (`checkpoint.dir`, default `<train.out_dir>/checkpoints`):

    step-00000200/        one complete checkpoint
        .metadata  __<rank>_<i>.distcp     torch.distributed.checkpoint (DCP) files
        meta.json          step, token count, data position, resilience counters, layout, format
        recipe.yaml        the recipe that produced it
        MANIFEST.json      size and sha256 of every file above; written last
    latest                 name of the newest published checkpoint (for people and tools)
    .tmp-step-00000300/    a save in progress, or one that was interrupted (never loaded)

Save (a collective: every rank calls it): all ranks write their pieces into `.tmp-step-N` with DCP;
each rank hashes the files it wrote; rank 0 writes meta.json, recipe.yaml and MANIFEST.json, fsyncs,
renames the directory to `step-N` (atomic on POSIX file systems), rewrites `latest` through a
temporary file and deletes checkpoints beyond `keep_last`. A process killed at any point leaves
either the old set of checkpoints or the new one, never a half-written `step-N`; a save that fails
removes its `.tmp-step-N` (a full disk is named as such). The first save after a `verify: size`
load hashes the checkpoint it came from first, and writes and prunes nothing if that fails.

Load: the candidates are the `step-*` directories, newest first (a newer complete checkpoint wins
over a stale `latest`). Each is verified before anything is deserialised (manifest present, every
file present with the recorded size and, with verify: checksum, sha256; the ranks split the files
between them), and with `fallback_to_previous` a damaged one is skipped with a warning naming the
problem. File names in the manifest and `.metadata` that leave the checkpoint directory are
refused. DCP's pickled `.metadata` is read with an unpickler that only admits DCP's own metadata
classes, and tensor data with `torch.load(weights_only=True)` (DCP's reader), so a checkpoint cannot
run code. A checkpoint written for a different model shape is an error, never a fallback.

Async save (`async_save: true`): the state is copied to host memory on the calling thread, and
the write, hashing and publishing run in one background thread over a dedicated gloo process group,
so the training loop's own collectives never interleave with the checkpoint's.
"""
from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from launch.checkpoint import files as cf
from launch.checkpoint import state as cs
from launch.checkpoint.files import (FORMAT, LATEST, MANIFEST, META, RECIPE, CheckpointError, SafeReader,
                                     list_checkpoints, read_manifest, step_dir_name, tensor_sizes, verify_files)
from launch.checkpoint.diagnose import caused_by, config_diff, describe_error
from launch.checkpoint.resume import resume_candidates
from parallel.runtime import LocalRuntime, Runtime
from parallel.zero import ZeroOptimizer


# --- collectives over the checkpoint's own group (no-ops in one process) --------------------------

class _Group:
    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        # A gloo group of its own: object collectives stay on the host, and an async save's
        # collectives never interleave with the training loop's on the default group.
        self.pg = dist.new_group(backend="gloo") if self.on else None

    def all_gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.pg, 0), group=self.pg)
        return box[0]


def _jsonable(x):
    return asdict(x) if is_dataclass(x) else x


class Checkpointer:
    """Save and load training checkpoints for one run. Construct it on every rank at the same point
    (it creates a process group); every method except `latest` is a collective."""

    def __init__(self, cfg, root: str | Path, runtime: Optional[Runtime] = None, device: str = "cpu",
                 log: bool = True):
        """`runtime`: where this rank's parameters sit (default: one process, the full model)."""
        self.cfg = cfg
        self.root = Path(root)
        self.runtime = runtime if runtime is not None else LocalRuntime.setup(device=device)
        self.device = device
        self.group = _Group()
        self.log = log and self.group.rank == 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "ckpt") if cfg.async_save else None
        self._pending: Optional[concurrent.futures.Future] = None
        self.last_saved: Optional[Path] = None
        self.last_loaded: Optional[Path] = None
        # Loaded with `verify: size`: its bytes were not hashed; the first save does that before it
        # publishes or prunes anything (see _check_source).
        self._unhashed: Optional[Path] = None

    def _say(self, msg: str) -> None:
        if self.log:
            print(f"checkpoint: {msg}", flush=True)

    # --- saving ---------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, meta: dict, recipe_yaml: str = "",
             blocking: Optional[bool] = None) -> Optional[Path]:
        """Checkpoint the current state as `step-<step>`. Returns its path once published, or None
        when it was handed to the background thread (`wait()` returns it later)."""
        self.wait()
        place = cs.placements(model, self.runtime.shards)
        cs.ensure_state(optimizer)
        entries = {**cs.model_entries(model, place), **cs.optimizer_entries(model, optimizer, place),
                   **cs.rng_entries(self.group.rank, self.device)}
        info = {"format": FORMAT, "kind": "full", "step": step, "saved_at": time.time(),
                "world_size": self.group.world, "torch": torch.__version__,
                "layout": _layout(self.runtime, optimizer), **{k: _jsonable(v) for k, v in meta.items()}}
        if blocking is False or (blocking is None and self._pool is not None):
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, "ckpt")
            # Copy now (the loop will change the tensors), write later.
            staged = {k: _to_host(v) for k, v in entries.items()}
            self._pending = self._pool.submit(self._write, staged, step, info, recipe_yaml)
            return None
        return self._write(entries, step, info, recipe_yaml)

    def save_weights(self, step: int, model, recipe_yaml: str = "") -> Path:
        """A weights-only checkpoint (e.g. imported from Hugging Face): loading it restores the model
        only, and training starts at step 0 with a fresh optimizer."""
        self.wait()
        entries = cs.model_entries(model, cs.placements(model, self.runtime.shards))
        info = {"format": FORMAT, "kind": "weights", "step": step, "saved_at": time.time(),
                "world_size": self.group.world, "torch": torch.__version__}
        return self._write(entries, step, info, recipe_yaml)

    def wait(self) -> Optional[Path]:
        """Finish the save in flight, if any; its error, if it failed, is raised here."""
        fut, self._pending = self._pending, None
        return fut.result() if fut is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _write(self, entries: dict, step: int, info: dict, recipe_yaml: str) -> Path:
        g, name = self.group, step_dir_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        start = time.perf_counter()
        self._check_source(name)
        prepared = None
        if g.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):  # interrupted earlier saves
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                prepared = self._no_space(final, e) or (f"saving {final} failed: cannot create {tmp} ({e}); "
                                                        "check the path and its permissions")
        prepared = g.broadcast(prepared)  # also the barrier: the directory exists before anyone writes
        if prepared:
            raise CheckpointError(prepared)
        try:
            writer = cf.RecordingWriter(tmp, sync_files=True)
            with cf.quiet():
                dcp.save(entries, storage_writer=writer, planner=cs.SavePlanner(), process_group=g.pg,
                         no_dist=not g.on)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException; it fails on all ranks
            self._discard(tmp)
            raise CheckpointError(self._no_space(final, e) or (
                f"saving {final} failed: {describe_error(e)}; the partial save was removed and the previous "
                f"checkpoints are untouched (check free space and permissions of {self.root})")) from e
        try:
            mine = {f: cf.file_record(tmp / f) for f in writer.written}
        except OSError as e:  # reported through the gather, so no rank is left waiting
            mine = {"": f"rank {g.rank}: {e}"}
        gathered = g.all_gather(mine)
        failed = [part[""] for part in gathered if "" in part]
        if failed:
            self._discard(tmp)
            raise CheckpointError(f"saving {final} failed: cannot read back the written files ({'; '.join(failed)}); "
                                  "the previous checkpoints are untouched")
        error = None
        if g.rank == 0:
            try:
                files = {k: v for part in gathered for k, v in part.items()}
                (tmp / META).write_text(json.dumps(info, indent=1))
                (tmp / RECIPE).write_text(recipe_yaml)
                for extra in (".metadata", META, RECIPE):
                    files[extra] = cf.file_record(tmp / extra)
                cf.write_atomic(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
                cf.fsync_dir(tmp)
                self._publish(tmp, final)
                self._prune(step)
            except OSError as e:
                self._discard(tmp)  # gone already if the rename happened: step-N is then complete
                error = self._no_space(final, e) or (f"publishing {final} failed: {e}; the checkpoints "
                                                     "published before are untouched")
        error = g.broadcast(error)  # every rank learns the outcome (and waits for the publish)
        if error:
            raise CheckpointError(error)
        self.last_saved = final
        self._say(f"saved {final} in {time.perf_counter() - start:.2f}s")
        return final

    def _discard(self, tmp: Path) -> None:
        """Remove a failed save at once: left behind, it would keep a full disk full."""
        if self.group.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _no_space(self, final: Path, e: BaseException) -> Optional[str]:
        """The message for a save that failed because the disk (or quota) is full, else None. The
        OSError is often buried: torch.save reports it as "unexpected pos", DCP wraps that."""
        if not caused_by(e, {errno.ENOSPC, errno.EDQUOT}):
            return None
        return (f"saving {final} failed: no space left on device in {self.root}; the partial save was removed "
                "and the previous checkpoints are untouched (free space there or set checkpoint.dir to another disk)")

    def _check_source(self, name: str) -> None:
        """Before the first save after a `verify: size` load: hash the checkpoint it came from. If
        that fails, this run's state descends from damaged bytes; publishing it would make it the
        newest checkpoint and pruning would delete the good ones, so nothing is written."""
        source = self._unhashed
        if source is None:
            return
        problem = self.verify(source, checksum=True)
        if problem:  # stays unhashed: every later save refuses too
            raise CheckpointError(
                f"not saving {name}: {source}, which this run resumed from, was loaded with checkpoint.verify: size "
                f"and now fails the full check ({problem}); nothing was pruned. Remove it and resume from an "
                "older checkpoint (checkpoint.verify: checksum skips damaged ones by itself)")
        self._unhashed = None

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # the same step saved again (e.g. after resuming from an older one)
            old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        cf.fsync_dir(self.root)
        cf.write_atomic(self.root / LATEST, final.name + "\n")
        cf.fsync_dir(self.root)

    def _prune(self, saved_step: int) -> None:
        # Checkpoints newer than the one just saved belong to an abandoned attempt (we resumed from
        # an older one); they are left alone and get replaced when the run reaches their step.
        older = [p for s, p in list_checkpoints(self.root) if s <= saved_step]
        for p in older[self.cfg.keep_last:]:
            shutil.rmtree(p, ignore_errors=True)

    # --- loading --------------------------------------------------------------------------------

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint under the root (not verified), or None."""
        for _, p in list_checkpoints(self.root):
            if (p / MANIFEST).is_file():
                return p
        return None

    def verify(self, path: Path, checksum: Optional[bool] = None) -> Optional[str]:
        """None if `path` is a complete, intact checkpoint, else the problem (same on every rank).
        `checksum`: also compare sha256 (default: as `checkpoint.verify` says)."""
        checksum = self.cfg.verify == "checksum" if checksum is None else checksum
        try:
            manifest = read_manifest(path)
            problems = verify_files(path, manifest["files"], checksum, (self.group.rank, self.group.world))
        except CheckpointError as e:
            problems = [str(e)]
        everyone = [p for part in self.group.all_gather(problems) for p in part]
        return "; ".join(sorted(set(everyone))) or None

    def load(self, model, optimizer, resume: Optional[str] = None) -> Optional[dict]:
        """Restore model, optimizer and RNG states from the newest good checkpoint; return its
        meta.json (step, tokens, data position, ...), or None when there is nothing to resume."""
        found = None
        if self.group.rank == 0:  # one rank reads the directory; all follow (and fail) alike
            try:
                found = resume_candidates(self.root, self.cfg.resume if resume is None else resume,
                                          self.cfg.fallback_to_previous, self._say)
            except CheckpointError as e:
                found = str(e)
        found = self.group.broadcast(found)
        if isinstance(found, str):
            raise CheckpointError(found)
        if not found:
            if (self.cfg.resume if resume is None else resume) != "never":
                self._say(f"no checkpoint in {self.root}; starting from scratch")
            return None
        failures = []
        for path in found:
            problem = self.verify(path)
            if problem is None:
                info = self._load_from(path, model, optimizer)
                self.last_loaded = path
                self._unhashed = path if self.cfg.verify != "checksum" else None
                return info
            failures.append(f"{path.name}: {problem}")
            if not self.cfg.fallback_to_previous:
                break
            self._say(f"WARNING: skipping {path}: {problem}")
        raise CheckpointError("no loadable checkpoint: " + " | ".join(failures) + ". Fix or remove the damaged "
                              "checkpoint(s), point checkpoint.resume at a good one, or set checkpoint.resume: "
                              "never to start from scratch")

    def _load_from(self, path: Path, model, optimizer) -> dict:
        start = time.perf_counter()
        info = json.loads((path / META).read_text())
        sizes = tensor_sizes(path)
        place = cs.placements(model, self.runtime.shards)
        entries = cs.model_entries(model, place)
        full = info.get("kind", "full") == "full"
        if full and optimizer is not None:
            cs.ensure_state(optimizer)
            entries.update(cs.optimizer_entries(model, optimizer, place))
        problems = cs.size_problems(entries, sizes)
        if problems:
            raise CheckpointError(f"{path} was written for a different model: {'; '.join(problems[:3])}"
                                  f"{' ...' if len(problems) > 3 else ''}.{config_diff(path, model)} Resume with "
                                  "the recipe that wrote it, or start a new run (checkpoint.resume: never / another dir)")
        rng = cs.rng_targets(self.group.rank, sizes) if full else {}
        try:
            with cf.quiet():
                dcp.load({**entries, **rng}, storage_reader=SafeReader(path), planner=cs.LoadPlanner(),
                         process_group=self.group.pg, no_dist=not self.group.on)
        except (Exception, CheckpointException) as e:  # one message for the many error types
            raise CheckpointError(f"reading {path} failed: {describe_error(e)}") from e
        cs.refresh_zero_shards(optimizer)
        if full and not cs.apply_rng(self.group.rank, rng, self.device):
            self._say("the checkpoint has no RNG state for some ranks (more ranks than when saved); they keep "
                      "their freshly seeded generators")
        self._say(f"loaded {path} (step {info.get('step')}) in {time.perf_counter() - start:.2f}s")
        return info


def _to_host(v):
    if isinstance(v, cs.Blocks):
        return cs.Blocks(v.global_shape, {o: t.detach().to("cpu", copy=True) for o, t in v.blocks.items()})
    return v.detach().to("cpu", copy=True)


def _layout(runtime, optimizer) -> dict:
    """The layout that wrote the checkpoint, for people and tools; loading never needs it (entries
    are saved under the full model's names, so any layout loads them)."""
    lay = runtime.layout
    # vpp lives in the runtime's ParallelConfig; a one-process runtime (pp = 1) has none and no chunks
    vpp = runtime.cfg.vpp if lay.pp > 1 else 1
    return {"tp": lay.tp, "pp": lay.pp, "vpp": vpp, "ep": lay.ep, "etp": lay.etp, "dp": lay.dp, "edp": lay.edp,
            "rank_order": "-".join(lay.order), "zero1": isinstance(optimizer, ZeroOptimizer)}


