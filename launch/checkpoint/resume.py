"""Which checkpoint a run resumes from, and loading bare model weights (evaluation, export).
Checkpointer.load drives a full resume; these are the pieces that need no process group."""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from launch.checkpoint import files as cf
from launch.checkpoint import state as cs
from launch.checkpoint.diagnose import config_diff, describe_error
from launch.checkpoint.files import (MANIFEST, META, STEP_DIR, CheckpointError, SafeReader, list_checkpoints,
                                     read_manifest, tensor_sizes, verify_files)


def resume_candidates(root: Path, resume: str, fallback_to_previous: bool, say=print) -> list[Path]:
    """Checkpoints to try, in order, for `checkpoint.resume` = `resume` in the run directory `root`.

    A path outside this run's directory is where a *new* run starts from (another run's
    checkpoint, another layout, imported weights): once this run has checkpoints of its own,
    a restart continues from those instead of going back to the start. A path inside this
    run's directory is an explicit roll-back and always wins."""
    own = [p for _, p in list_checkpoints(root)]
    if resume == "never":
        if own:  # a fresh run would interleave its checkpoints with an earlier run's
            raise CheckpointError(
                f"checkpoint.resume: never, but {root} already holds checkpoints of an earlier run "
                f"(newest {own[0].name}); use another train.out_dir or checkpoint.dir, delete them, "
                "or continue that run with checkpoint.resume: auto")
        return []
    if resume == "auto":
        return own
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume: {path} does not exist; give a step-N checkpoint directory, "
                              "a checkpoint root, auto or never")
    inside = root.exists() and path.resolve().is_relative_to(root.resolve())
    if own and not inside:
        say(f"{root} has checkpoints of this run; resuming from them, not from {path}")
        return own
    if STEP_DIR.match(path.name) or (path / MANIFEST).exists():
        m = STEP_DIR.match(path.name)
        rest = [p for s, p in list_checkpoints(path.parent) if m and s < int(m.group(1))]
        return [path] + (rest if fallback_to_previous else [])
    found = [p for _, p in list_checkpoints(path)]
    if not found:
        raise CheckpointError(f"checkpoint.resume: {path} holds no step-N checkpoint directories")
    return found


def load_model_weights(path: str | Path, model) -> dict:
    """Load only the model weights of checkpoint `path` into a full (single-process) model, e.g. for
    evaluation or export, after verifying every file against the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = verify_files(path, manifest["files"], checksum=True)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    entries = cs.model_entries(model, cs.placements(model))
    problems = cs.size_problems(entries, tensor_sizes(path))
    if problems:
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems[:3])}.{config_diff(path, model)}")
    try:
        with cf.quiet():
            dcp.load(entries, storage_reader=SafeReader(path), planner=cs.LoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"reading {path} failed: {describe_error(e)}") from e
    return json.loads((path / META).read_text())
