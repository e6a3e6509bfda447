"""Checkpoint failures in one line: what lies behind an error raised inside DCP (a full disk, a
rank's traceback) and how a checkpoint's recipe differs from the model it is loaded into."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml
from torch.distributed.checkpoint.api import CheckpointException

from launch.checkpoint.files import RECIPE


def caused_by(e: BaseException, errnos: set) -> bool:
    """Whether an OSError with one of `errnos` is `e` or behind it (its cause or context, or a
    rank's failure inside DCP's CheckpointException)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in errnos:
            return True
        todo += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            todo += [failure[0] for failure in x.failures.values()]
    return False


def describe_error(e: BaseException) -> str:
    """`Type: message` of the underlying error, in one line (DCP wraps each rank's traceback into
    one CheckpointException; the last line of the first is the actual error)."""
    text = str(e).strip()
    if "Traceback" in text:
        block = text.split("Traceback", 2)[1]
        lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith(" ")]
        return lines[-1][:500] if lines else text[:500]
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:500]}"


def config_diff(path: Path, model) -> str:
    cfg = getattr(model, "cfg", None)
    recipe = path / RECIPE
    if cfg is None or not recipe.is_file():
        return ""
    try:
        saved = (yaml.safe_load(recipe.read_text()) or {}).get("model") or {}
    except yaml.YAMLError:
        return ""
    here = asdict(cfg)
    diff = [f"{k}={saved[k]!r} there, {here[k]!r} here" for k in here if k in saved and saved[k] != here[k]]
    return f" Its recipe differs in model.{', model.'.join(diff)}." if diff else ""
