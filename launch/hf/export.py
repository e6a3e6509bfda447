"""`ultramoe export-hf`: the model of a training checkpoint -> the Hugging Face layout (config.json +
*.safetensors, DeepSeek-V3 tensor names). The name map is `moe/hf_names.py`, config.json
`launch/hf/config.py`; `launch/hf/import_.py` is the way back.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Optional

import torch

from config import ConfigError, from_dict
from launch.hf.config import HFError, hf_config
from moe.config import ModelConfig
from moe.hf_names import EXPERT_PROJ, expert_map, mtp_copies, name_map

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Our full (single-device) state dict -> HF tensors."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    out = {}
    for ours, hf, fwd, _ in name_map(cfg):
        out[hf] = cast(fwd(state[ours])).contiguous()
    for ours, hf in expert_map(cfg):
        for name, proj in EXPERT_PROJ.items():
            stack = state[f"{ours}.{name}"]
            for j in range(stack.shape[0]):
                out[f"{hf}.{j}.{proj}.weight"] = cast(stack[j].t()).contiguous()
    for hf, ours in mtp_copies(cfg):
        out[hf] = cast(state[ours]).clone()  # own storage: safetensors refuses shared tensors
    return out


def save_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path,
            max_shard_bytes: int = 5 << 30) -> Path:
    """Write config.json and safetensors shards (with an index when more than one) into `out`,
    through a temporary directory renamed at the end: never a half-written export."""
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HFError(f"{out} exists and is not empty; choose another --out or remove it")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        shards, size = [[]], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for names, fname in zip(shards, files):
            save_file({n: tensors[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        if len(files) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        dtype = next(iter(tensors.values())).dtype
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=1))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None,
                      max_shard_bytes: int = 5 << 30) -> Path:
    """Export the model of a training checkpoint (any layout it was saved with) to HF layout."""
    import yaml

    from launch.checkpoint.checkpointer import Checkpointer, load_model_weights
    from launch.trainer.recipe import CheckpointConfig
    from moe.model import MoETransformer
    path = Path(checkpoint)
    if not (path / "MANIFEST.json").exists():  # a checkpoint root: take its newest complete one
        newest = Checkpointer(CheckpointConfig(), path, log=False).latest()
        if newest is None:
            raise HFError(f"{path}: no complete checkpoint (a step-N directory with MANIFEST.json) here")
        path = newest
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
        cfg = from_dict(ModelConfig, recipe.get("model") or {}, "recipe.yaml:model")
    except (OSError, yaml.YAMLError, ConfigError) as e:
        raise HFError(f"{path}/recipe.yaml: cannot read the model config ({e})") from None
    with torch.device("meta"):
        model = MoETransformer(cfg)  # shapes only; the weights come from the checkpoint
    model = model.to_empty(device="cpu")
    load_model_weights(path, model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return save_hf(to_hf(state, cfg, DTYPES[dtype] if dtype else None), cfg, out, max_shard_bytes)


# --- command line -------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ultramoe export-hf", description="Export a training checkpoint's model "
                                 "to Hugging Face layout (config.json + safetensors, DeepSeek-V3 names).")
    ap.add_argument("--checkpoint", required=True, help="a step-N checkpoint directory, or a checkpoint root "
                    "(its newest complete checkpoint is used)")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (GB)")
    args = ap.parse_args(argv)
    from launch.checkpoint.checkpointer import CheckpointError
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * (1 << 30)))
    except (HFError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
