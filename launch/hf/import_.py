"""`ultramoe import-hf`: a Hugging Face model directory (written by `launch/hf/export.py`, or
DeepSeek-V3 style) -> a weights-only training checkpoint that a run starts from at step 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from config import ConfigError
from launch.hf.config import HFError, config_from_hf
from moe.config import ModelConfig
from moe.hf_names import EXPERT_PROJ, expert_map, mtp_copies, name_map


def read_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from an HF directory written by `save_hf` or DeepSeek-V3 style."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFError(f"{path}: no config.json; point --hf at a Hugging Face model directory")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFError(f"{path}: no *.safetensors files")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))  # safetensors: plain tensors, no code can run
        except (SafetensorError, OSError) as e:
            raise HFError(f"{f}: unreadable safetensors file ({e}); re-download or re-export it") from None
    return cfg, from_hf(hf, cfg)


def from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our full state dict; every tensor must be used, every needed one present."""
    used, missing, out = set(), [], {}

    def take(name: str) -> Optional[torch.Tensor]:
        if name not in hf:
            missing.append(name)
            return None
        used.add(name)
        return hf[name]
    for ours, name, _, back in name_map(cfg):
        t = take(name)
        if t is not None:
            out[ours] = back(t).contiguous()
    for ours, prefix in expert_map(cfg):
        for key, proj in EXPERT_PROJ.items():
            mats = [take(f"{prefix}.{j}.{proj}.weight") for j in range(cfg.num_experts)]
            if all(m is not None for m in mats):
                out[f"{ours}.{key}"] = torch.stack([m.t() for m in mats]).contiguous()
    for name, _ in mtp_copies(cfg):  # copies of the shared embedding / head: optional
        if name in hf:
            used.add(name)
    if cfg.num_moe_layers and not cfg.expert_bias:
        for ours, _ in expert_map(cfg):  # our routers always hold a (zero) bias buffer
            out[ours.replace(".experts", ".router.expert_bias")] = torch.zeros(cfg.num_experts)
    extra = sorted(n for n in hf if n not in used and "rotary_emb" not in n)
    if missing or extra:
        parts = ([f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})"] if missing else []) + \
                ([f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})"] if extra else [])
        raise HFError("the safetensors do not match config.json: " + "; ".join(parts)
                      + ". Is config.json from the same model?")
    return out


def import_to_checkpoint(hf_dir: str | Path, out_root: str | Path) -> Path:
    """Write the HF model as a weights-only training checkpoint `out_root/step-00000000`: a run with
    checkpoint.resume set to it starts from these weights at step 0 with a fresh optimizer."""
    import yaml

    from launch.checkpoint.checkpointer import Checkpointer
    from launch.trainer.recipe import CheckpointConfig
    from moe.model import MoETransformer
    cfg, state = read_hf(hf_dir)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    ck = Checkpointer(CheckpointConfig(), out_root, log=False)
    return ck.save_weights(0, model, yaml.safe_dump({"model": asdict(cfg)}, sort_keys=False))


# --- command line -------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ultramoe import-hf", description="Turn a Hugging Face model directory "
                                 "(DeepSeek-V3 names) into a weights-only training checkpoint.")
    ap.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    ap.add_argument("--out", required=True, help="checkpoint root to write step-00000000 into")
    args = ap.parse_args(argv)
    try:
        path = import_to_checkpoint(args.hf, args.out)
    except (HFError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.hf} -> {path}\nstart training from it with: checkpoint.resume={path} "
          f"(the model section of your recipe must match {path / 'recipe.yaml'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
