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
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from config import ConfigError, from_dict
from launch.hf.config import MARKED_TYPE, HFError, hf_config, transformers_gaps
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


def check_out(out: str | Path) -> Path:
    """`out` as an absolute path, if it is new or an empty directory."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise HFError(f"{out} is a file; choose a directory for --out")
    if out.exists() and any(out.iterdir()):
        raise HFError(f"{out} exists and is not empty; choose another --out or remove it")
    return out


def save_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path,
            max_shard_bytes: int = 5 << 30) -> Path:
    """Write config.json and safetensors shards (with an index when more than one) into `out`,
    through a temporary directory renamed at the end: never a half-written export."""
    from safetensors.torch import save_file
    out = check_out(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # e.g. a parent is a file or read-only
        raise HFError(f"cannot create {out}: {e.strerror or e}") from None
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. no space left: nothing half-written stays behind
            raise HFError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None,
                      max_shard_bytes: int = 5 << 30, drop_mtp: bool = False,
                      not_for_transformers: bool = False) -> Path:
    """Export the model of a training checkpoint (any layout it was saved with) to HF layout.
    A model transformers' DeepseekV3ForCausalLM would compute differently is refused unless
    `not_for_transformers` (the export is then marked so transformers will not load it);
    `drop_mtp` exports the model without its MTP modules."""
    import yaml

    from launch.checkpoint.checkpointer import Checkpointer
    from launch.checkpoint.resume import load_model_weights
    from launch.trainer.recipe import CheckpointConfig
    from moe.model import MoETransformer
    check_out(out)  # before the (possibly long) load
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
    out_cfg = replace(cfg, mtp_layers=0) if drop_mtp else cfg
    gaps = transformers_gaps(out_cfg)
    if gaps and not not_for_transformers:
        marked = f"an export marked model_type '{MARKED_TYPE}', which transformers refuses to load"
        fix = (f"Pass --drop-mtp to export the main model only (transformers computes its logits), or "
               f"--not-for-transformers to keep MTP in {marked}" if all(g.startswith("mtp_layers") for g in gaps)
               else f"Pass --not-for-transformers to write {marked}")
        raise HFError(f"transformers' DeepseekV3ForCausalLM would load this model and compute something else: "
                      f"{'; '.join(gaps)}. {fix}")
    with torch.device("meta"):
        model = MoETransformer(cfg)  # shapes only; the weights come from the checkpoint
    model = model.to_empty(device="cpu")
    load_model_weights(path, model)
    state = {k: v.detach() for k, v in model.state_dict().items() if not (drop_mtp and k.startswith("mtp."))}
    return save_hf(to_hf(state, out_cfg, DTYPES[dtype] if dtype else None), out_cfg, out, max_shard_bytes)


# --- command line -------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ultramoe export-hf", description="Export a training checkpoint's model "
                                 "to Hugging Face layout (config.json + safetensors, DeepSeek-V3 names).")
    ap.add_argument("--checkpoint", required=True, help="a step-N checkpoint directory, or a checkpoint root "
                    "(its newest complete checkpoint is used)")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (GB)")
    ap.add_argument("--drop-mtp", action="store_true", help="leave the MTP modules out (transformers does not "
                    "read ours); the export is then the main model only")
    ap.add_argument("--not-for-transformers", action="store_true", help="export a model transformers' "
                    f"DeepseekV3ForCausalLM cannot compute (sandwich norm, softmax routing, GQA, MTP, ...): "
                    f"config.json then says model_type '{MARKED_TYPE}', so transformers refuses to load it; "
                    "import-hf restores it exactly")
    args = ap.parse_args(argv)
    from launch.checkpoint.checkpointer import CheckpointError
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * (1 << 30)),
                                args.drop_mtp, args.not_for_transformers)
    except (HFError, ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
