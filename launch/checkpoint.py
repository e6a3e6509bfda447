"""Training checkpoints on disk: written atomically, verified on load, kept in rotation, resumable
under any parallel layout. `launch/checkpoint_state.py` says what goes in; this file says how.

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
either the old set of checkpoints or the new one, never a half-written `step-N`.

Load: the candidates are the `step-*` directories, newest first (a newer complete checkpoint wins
over a stale `latest`). Each is verified before anything is deserialised (manifest present, every
file present with the recorded size and, with verify: checksum, sha256; the ranks split the files
between them), and with `fallback_to_previous` a damaged one is skipped with a warning naming the
problem. DCP's pickled `.metadata` is read with an unpickler that only admits DCP's own metadata
classes, and tensor data with `torch.load(weights_only=True)` (DCP's reader), so a checkpoint cannot
run code. A checkpoint written for a different model shape is an error, never a fallback.

Async save (`async_save: true`): the state is copied to host memory on the calling thread, and
the write, hashing and publishing run in one background thread over a dedicated gloo process group,
so the training loop's own collectives never interleave with the checkpoint's.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from launch import checkpoint_state as cs

FORMAT = "ultramoe-checkpoint/1"
MANIFEST, META, RECIPE, LATEST = "MANIFEST.json", "meta.json", "recipe.yaml", "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process save/load that no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names it, the problem and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# --- safe reading of DCP metadata ---------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's `.metadata` pickle holds: its metadata dataclasses, torch.Size,
    dtypes and layouts, and paths. Anything else (a crafted file) is refused before it runs."""

    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        obj = super().find_class(module, name)
        if (module, name) in self._ALLOWED or (module == "torch" and isinstance(obj, torch.dtype)):
            return obj
        if module == "torch.distributed.checkpoint.metadata" and not name.startswith("__"):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _RecordingWriter(FileSystemWriter):
    """FileSystemWriter that remembers which files this rank wrote (for the manifest)."""

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        self.written = sorted({r.storage_data.relative_path for r in fut.wait()})
        return fut


def tensor_sizes(path: Path) -> dict[str, torch.Size]:
    md = SafeReader(path).read_metadata()
    return {k: v.size for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


# --- manifest and verification --------------------------------------------------------------------

def _file_record(path: Path, checksum: bool = True) -> dict:
    rec = {"size": path.stat().st_size}
    if checksum:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        rec["sha256"] = h.hexdigest()
    return rec


def read_manifest(path: Path) -> dict:
    m = path / MANIFEST
    if not m.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so the save never finished (or the copy is partial)")
    try:
        manifest = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{m}: unreadable ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{m}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest


def verify_files(path: Path, files: dict, checksum: bool, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems with this share (rank, world) of the manifest's files; empty when all match."""
    problems = []
    rank, world = share
    for i, name in enumerate(sorted(files)):
        if i % world != rank:
            continue
        want, f = files[name], path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        got = _file_record(f, checksum and "sha256" in want)
        if got["size"] != want["size"]:
            problems.append(f"{name} has {got['size']} bytes, the manifest says {want['size']} (truncated?)")
        elif checksum and got.get("sha256") != want.get("sha256"):
            problems.append(f"{name} fails its sha256 check (corrupted)")
    return problems


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every `step-N` directory under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- collectives over the checkpoint's own group (no-ops in one process) --------------------------

class _Group:
    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        # A gloo group of its own: object collectives stay on the host, and an async save's
        # collectives never interleave with the training loop's on the default group.
        self.pg = dist.new_group(backend="gloo") if self.on else None

    def barrier(self) -> None:
        if self.on:
            dist.barrier(group=self.pg)

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

    def __init__(self, cfg, root: str | Path, runtime=None, device: str = "cpu", log: bool = True):
        self.cfg = cfg
        self.root = Path(root)
        self.runtime = runtime
        self.device = device
        self.group = _Group()
        self.log = log and self.group.rank == 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "ckpt") if cfg.async_save else None
        self._pending: Optional[concurrent.futures.Future] = None
        self.last_saved: Optional[Path] = None

    def _say(self, msg: str) -> None:
        if self.log:
            print(f"checkpoint: {msg}", flush=True)

    # --- saving ---------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, meta: dict, recipe_yaml: str = "",
             blocking: Optional[bool] = None) -> Optional[Path]:
        """Checkpoint the current state as `step-<step>`. Returns its path once published, or None
        when it was handed to the background thread (`wait()` returns it later)."""
        self.wait()
        place = cs.placements(model, self.runtime)
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
        try:
            if g.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):  # interrupted earlier saves
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            g.barrier()
            writer = _RecordingWriter(tmp, sync_files=True)
            with _quiet():
                dcp.save(entries, storage_writer=writer, planner=cs.SavePlanner(), process_group=g.pg,
                         no_dist=not g.on)
            mine = {f: _file_record(tmp / f) for f in writer.written}
            gathered = g.all_gather(mine)
        except Exception as e:  # noqa: BLE001 - one clear message for any failure of the write
            raise CheckpointError(f"saving {final} failed: {_describe(e)}; the previous "
                                  f"checkpoints are untouched (check free space and permissions of {self.root})") from e
        error = None
        if g.rank == 0:
            try:
                files = {k: v for part in gathered for k, v in part.items()}
                (tmp / META).write_text(json.dumps(info, indent=1))
                (tmp / RECIPE).write_text(recipe_yaml)
                for extra in (".metadata", META, RECIPE):
                    files[extra] = _file_record(tmp / extra)
                _write_atomic(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
                _fsync_dir(tmp)
                self._publish(tmp, final)
                self._prune(step)
            except OSError as e:
                error = f"publishing {final} failed: {e}; the previous checkpoints are untouched"
        error = g.broadcast(error)  # every rank learns the outcome (and waits for the publish)
        if error:
            raise CheckpointError(error)
        self.last_saved = final
        self._say(f"saved {final} in {time.perf_counter() - start:.2f}s")
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # the same step saved again (e.g. after resuming from an older one)
            old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        _fsync_dir(self.root)

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

    def candidates(self, resume: Optional[str] = None) -> list[Path]:
        """Checkpoints to try, in order, for `resume` (default: the config's)."""
        resume = self.cfg.resume if resume is None else resume
        if resume == "never":
            return []
        if resume == "auto":
            return [p for _, p in list_checkpoints(self.root)]
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume: {path} does not exist; give a step-N checkpoint directory, "
                                  "a checkpoint root, auto or never")
        if _STEP_DIR.match(path.name) or (path / MANIFEST).exists():
            m = _STEP_DIR.match(path.name)
            rest = [p for s, p in list_checkpoints(path.parent) if m and s < int(m.group(1))]
            return [path] + (rest if self.cfg.fallback_to_previous else [])
        found = [p for _, p in list_checkpoints(path)]
        if not found:
            raise CheckpointError(f"checkpoint.resume: {path} holds no step-N checkpoint directories")
        return found

    def verify(self, path: Path) -> Optional[str]:
        """None if `path` is a complete, intact checkpoint, else the problem (same on every rank)."""
        try:
            manifest = read_manifest(path)
            problems = verify_files(path, manifest["files"], self.cfg.verify == "checksum",
                                    (self.group.rank, self.group.world))
        except CheckpointError as e:
            problems = [str(e)]
        everyone = [p for part in self.group.all_gather(problems) for p in part]
        return "; ".join(sorted(set(everyone))) or None

    def load(self, model, optimizer, resume: Optional[str] = None) -> Optional[dict]:
        """Restore model, optimizer and RNG states from the newest good checkpoint; return its
        meta.json (step, tokens, data position, ...), or None when there is nothing to resume."""
        found = self.group.broadcast(self.candidates(resume) if self.group.rank == 0 else None)
        if not found:
            if (self.cfg.resume if resume is None else resume) != "never":
                self._say(f"no checkpoint in {self.root}; starting from scratch")
            return None
        failures = []
        for path in found:
            problem = self.verify(path)
            if problem is None:
                return self._load_from(path, model, optimizer)
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
        place = cs.placements(model, self.runtime)
        entries = cs.model_entries(model, place)
        full = info.get("kind", "full") == "full"
        if full and optimizer is not None:
            cs.ensure_state(optimizer)
            entries.update(cs.optimizer_entries(model, optimizer, place))
        problems = cs.size_problems(entries, sizes)
        if problems:
            raise CheckpointError(f"{path} was written for a different model: {'; '.join(problems[:3])}"
                                  f"{' ...' if len(problems) > 3 else ''}.{_config_diff(path, model)} Resume with "
                                  "the recipe that wrote it, or start a new run (checkpoint.resume: never / another dir)")
        rng = cs.rng_targets(self.group.rank, sizes) if full else {}
        try:
            with _quiet():
                dcp.load({**entries, **rng}, storage_reader=SafeReader(path), planner=cs.LoadPlanner(),
                         process_group=self.group.pg, no_dist=not self.group.on)
        except Exception as e:  # noqa: BLE001 - DCP raises many types; the user needs one message
            raise CheckpointError(f"reading {path} failed: {_describe(e)}") from e
        cs.refresh_zero_shards(optimizer)
        if full and not cs.apply_rng(self.group.rank, rng, self.device):
            self._say("the checkpoint has no RNG state for some ranks (more ranks than when saved); they keep "
                      "their freshly seeded generators")
        self._say(f"loaded {path} (step {info.get('step')}) in {time.perf_counter() - start:.2f}s")
        return info


def _to_host(v):
    if isinstance(v, cs.Piece):
        return cs.Piece(v.local.detach().to("cpu", copy=True), v.global_shape, v.offsets)
    return v.detach().to("cpu", copy=True)


def _layout(runtime, optimizer) -> dict:
    if runtime is None:
        return {"ep": 1, "dp": 1, "zero1": False}
    return {"ep": runtime.layout.ep, "dp": runtime.layout.dp, "edp": runtime.layout.edp,
            "zero1": hasattr(optimizer, "buckets")}


def _describe(e: BaseException) -> str:
    """`Type: message` of the underlying error, in one line (DCP wraps each rank's traceback into
    one CheckpointException; the last line of the first is the actual error)."""
    text = str(e).strip()
    if "Traceback" in text:
        block = text.split("Traceback", 2)[1]
        lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith(" ")]
        return lines[-1][:500] if lines else text[:500]
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:500]}"


def _config_diff(path: Path, model) -> str:
    cfg = getattr(model, "cfg", None)
    recipe = path / RECIPE
    if cfg is None or not recipe.is_file():
        return ""
    import yaml
    try:
        saved = (yaml.safe_load(recipe.read_text()) or {}).get("model") or {}
    except yaml.YAMLError:
        return ""
    here = asdict(cfg)
    diff = [f"{k}={saved[k]!r} there, {here[k]!r} here" for k in here if k in saved and saved[k] != here[k]]
    return f" Its recipe differs in model.{', model.'.join(diff)}." if diff else ""


def load_model_weights(path: str | Path, model) -> dict:
    """Load only the model weights of checkpoint `path` (single process; e.g. for evaluation or
    export). Verifies sizes only, not checksums (see `Checkpointer.verify` for the full check)."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = verify_files(path, manifest["files"], checksum=False)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    entries = cs.model_entries(model, cs.placements(model))
    problems = cs.size_problems(entries, tensor_sizes(path))
    if problems:
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems[:3])}.{_config_diff(path, model)}")
    with _quiet():
        dcp.load(entries, storage_reader=SafeReader(path), planner=cs.LoadPlanner(), no_dist=True)
    return json.loads((path / META).read_text())


if __name__ == "__main__":
    sys.exit("launch/checkpoint.py is a library; see launch/CHECKPOINTS.md")
