"""`ultramoe import-hf`: a Hugging Face model directory (written by `launch/hf/export.py`, or
DeepSeek-V3 style) -> a weights-only training checkpoint that a run starts from at step 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from config import ConfigError
from launch.hf.config import LATENT_NORM_EPS, HFError, config_from_hf
from moe.config import ModelConfig
from moe.hf_names import EXPERT_PROJ, expert_map, mtp_copies, name_map


def read_hf(path: str | Path, notes: Optional[list[str]] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) from an HF directory written by `save_hf` or DeepSeek-V3 style;
    what was adapted on the way is appended to `notes`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFError(f"{path}: no config.json; point --hf at a Hugging Face model directory")
    try:
        conf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise HFError(f"{path / 'config.json'}: not readable JSON ({e})") from None
    cfg = config_from_hf(conf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFError(f"{path}: no *.safetensors files")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))  # safetensors: plain tensors, no code can run
        except (SafetensorError, OSError) as e:
            raise HFError(f"{f}: unreadable safetensors file ({e}); re-download or re-export it") from None
    notes = notes if notes is not None else []
    if "ultramoe" not in conf and cfg.norm_eps != LATENT_NORM_EPS:
        notes.append(f"rms_norm_eps={cfg.norm_eps:g}: our q/kv latent norms use it too, transformers' use "
                     f"{LATENT_NORM_EPS:g}, so logits differ slightly")
    mtp_prefix = f"model.layers.{cfg.num_layers}."
    if "ultramoe" not in conf and cfg.mtp_layers and not any(n.startswith(mtp_prefix) for n in hf):
        # transformers writes num_nextn_predict_layers (default 1) but never the MTP layers
        notes.append(
            f"config.json declares num_nextn_predict_layers={cfg.mtp_layers} but the safetensors hold no MTP "
            "layer: imported without MTP")
        cfg = replace(cfg, mtp_layers=0)
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
        if name.endswith(".e_score_correction_bias") and not cfg.expert_bias:
            out[ours] = _unused_bias(hf.get(name), cfg, name)  # optional: exports before it was written
            used.add(name)
            continue
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
    extra = sorted(n for n in hf if n not in used and "rotary_emb" not in n)
    if missing or extra:
        parts = ([f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})"] if missing else []) + \
                ([f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})"] if extra else [])
        raise HFError("the safetensors do not match config.json: " + "; ".join(parts)
                      + ". Is config.json from the same model?")
    return out


def _unused_bias(t: Optional[torch.Tensor], cfg: ModelConfig, name: str) -> torch.Tensor:
    """Without expert_bias our routers select without a bias: only an all-zero tensor means that."""
    if t is not None and bool(t.any()):
        raise HFError(f"{name} is not zero but config.json's topk_method is not 'noaux_tc'; set topk_method to "
                      "'noaux_tc' (DeepSeek-V3 selects with this bias) or zero the bias")
    return torch.zeros(cfg.num_experts)


def existing_checkpoints(root: Path) -> Optional[str]:
    """What in `root` a new step-0 checkpoint would supersede, or None when there is nothing."""
    from launch.checkpoint.files import LATEST, list_checkpoints
    steps = list_checkpoints(root)
    if steps:
        return f"{len(steps)} checkpoint(s), newest {steps[0][1].name}"
    return f"a '{LATEST}' pointer" if (root / LATEST).exists() else None


def import_to_checkpoint(hf_dir: str | Path, out_root: str | Path, force: bool = False,
                         notes: Optional[list[str]] = None) -> Path:
    """Write the HF model as a weights-only training checkpoint `out_root/step-00000000`: a run with
    checkpoint.resume set to it starts from these weights at step 0 with a fresh optimizer."""
    import yaml

    from launch.checkpoint.checkpointer import Checkpointer
    from launch.trainer.recipe import CheckpointConfig
    from moe.model import MoETransformer
    cfg, state = read_hf(hf_dir, notes)
    root = Path(out_root)
    if root.exists() and not root.is_dir():
        raise HFError(f"--out {root} is a file; name a checkpoint directory")
    found = existing_checkpoints(root)
    if found and not force:
        # save_weights would repoint `latest` at step 0: the run there would resume from these weights
        raise HFError(f"--out {root} already holds {found}; importing would repoint 'latest' at step 0. "
                      "Choose an empty --out, or pass --force")
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    ck = Checkpointer(CheckpointConfig(), root, log=False)
    return ck.save_weights(0, model, yaml.safe_dump({"model": asdict(cfg)}, sort_keys=False))


# --- command line -------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ultramoe import-hf", description="Turn a Hugging Face model directory "
                                 "(DeepSeek-V3 names) into a weights-only training checkpoint.")
    ap.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    ap.add_argument("--out", required=True, help="checkpoint root to write step-00000000 into (empty or new)")
    ap.add_argument("--force", action="store_true", help="write into a root that already holds checkpoints; "
                    "its 'latest' then points at the imported step 0")
    args = ap.parse_args(argv)
    from launch.checkpoint.checkpointer import CheckpointError
    notes: list[str] = []
    try:
        path = import_to_checkpoint(args.hf, args.out, args.force, notes)
    except (HFError, ConfigError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    print(f"imported {args.hf} -> {path}\nstart training from it with: checkpoint.resume={path} "
          f"(the model section of your recipe must match {path / 'recipe.yaml'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
