"""The on-disk side of checkpoints: directory names, the manifest and its verification, safe
reading of DCP metadata, and atomic file operations. `launch/checkpoint/checkpointer.py` drives them."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import uuid
import warnings
from pathlib import Path, PurePath, PurePosixPath

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

FORMAT = "ultramoe-checkpoint/1"
MANIFEST, META, RECIPE, LATEST = "MANIFEST.json", "meta.json", "recipe.yaml", "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def quiet():
    """DCP warns on every single-process save/load that no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message names it, the problem and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def inside(name) -> bool:
    """Whether `name`, a file name from a manifest or DCP metadata, stays inside the checkpoint
    directory: relative and without `..` (a crafted file could otherwise point anywhere)."""
    if not isinstance(name, (str, PurePath)) or not str(name):
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts


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
        storage = getattr(metadata, "storage_data", None)
        names = [getattr(s, "relative_path", None) for s in storage.values()] if isinstance(storage, dict) else [None]
        outside = [n for n in names if not inside(n)]
        if outside:
            raise CheckpointError(f"{path}: points at {str(outside[0])!r}, a path outside the checkpoint "
                                  "directory; refusing to read it (the metadata is crafted or damaged)")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class RecordingWriter(FileSystemWriter):
    """FileSystemWriter that remembers which files this rank wrote (for the manifest)."""

    def write_data(self, plan, planner):
        fut = super().write_data(plan, planner)
        self.written = sorted({r.storage_data.relative_path for r in fut.wait()})
        return fut


def tensor_sizes(path: Path) -> dict[str, torch.Size]:
    md = SafeReader(path).read_metadata()
    return {k: v.size for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


# --- manifest and verification --------------------------------------------------------------------

def file_record(path: Path, checksum: bool = True) -> dict:
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
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{m}: no file list (the manifest is damaged)")
    outside = [name for name in files if not inside(name)]
    if outside:
        raise CheckpointError(f"{m}: lists {outside[0]!r}, a path outside the checkpoint directory; refusing to "
                              "read it (the manifest is crafted or damaged)")
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
        got = file_record(f, checksum and "sha256" in want)
        if got["size"] != want["size"]:
            problems.append(f"{name} has {got['size']} bytes, the manifest says {want['size']} (truncated?)")
        elif checksum and got.get("sha256") != want.get("sha256"):
            problems.append(f"{name} fails its sha256 check (corrupted)")
    return problems


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every `step-N` directory under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def fsync_dir(path: Path) -> None:
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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
