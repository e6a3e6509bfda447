"""Export a trained model to the Hugging Face layout (config.json + *.safetensors, DeepSeek-V3 tensor
names) and import it back. Commands: `ultramoe export-hf` and `ultramoe import-hf`.

Name map (ours -> HF; i = layer, j = expert, L = num_layers, k = MTP depth - 1):

    embed.weight                          model.embed_tokens.weight
    norm.weight / head.weight             model.norm.weight / lm_head.weight (no lm_head when tied)
    layers.i.attn_norm                    model.layers.i.input_layernorm
    layers.i.mlp_norm                     model.layers.i.post_attention_layernorm  (DeepSeek: the pre-MLP norm)
    layers.i.attn_post_norm               model.layers.i.post_self_attn_layernorm  (sandwich norm; GLM-4's name)
    layers.i.mlp_post_norm                model.layers.i.post_mlp_layernorm        (sandwich norm; GLM-4's name)
    attn.wq_a / q_norm / wq_b / wq        self_attn.q_a_proj / q_a_layernorm / q_b_proj / q_proj
    attn.wkv_a / kv_norm / wkv_b / wo     self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj
    attn.wq/wk/wv/wo (GQA)                self_attn.q_proj / k_proj / v_proj / o_proj
    mlp.w1 / w3 / w2 (dense)              mlp.gate_proj / up_proj / down_proj
    mlp.router.weight / .expert_bias      mlp.gate.weight / mlp.gate.e_score_correction_bias (with expert_bias)
    mlp.experts.w1_EDF[j] (D x F)         mlp.experts.j.gate_proj.weight = transpose (F x D: Linear is [out, in])
    mlp.experts.w3_EDF[j]                 mlp.experts.j.up_proj.weight = transpose
    mlp.experts.w2_EFD[j] (F x D)         mlp.experts.j.down_proj.weight = transpose (D x F)
    mlp.shared.w1 / w3 / w2               mlp.shared_experts.gate_proj / up_proj / down_proj
    mtp.k.embed_norm / hidden_norm        model.layers.(L+k).enorm / hnorm
    mtp.k.proj                            model.layers.(L+k).eh_proj (column halves swapped: DeepSeek feeds
                                          [embedding, hidden], we feed [hidden, embedding])
    mtp.k.block.*                         model.layers.(L+k).* as for a layer
    mtp.k.norm                            model.layers.(L+k).shared_head.norm; the shared embedding and head
                                          are also written as model.layers.(L+k).embed_tokens / shared_head.head

RoPE: we rotate halves (channel c pairs with c + d/2); DeepSeek-V3 checkpoints store the rope
channels interleaved (pairs 2c, 2c+1; HF `rope_interleave: true`, vLLM's non-NeoX rotary). Export
reorders the rope output rows of q_b_proj (q_proj) per head and of kv_a_proj_with_mqa; import
undoes it. GQA weights are written in rotate-half (Llama) order, unchanged.

config.json carries the DeepSeek-V3 fields inference engines read plus an `ultramoe` block with our
full ModelConfig, so import restores the exact model; without that block (a genuine DeepSeek-V3
style checkpoint) the config is derived from the DeepSeek fields. A model with sandwich norms or
GQA attention is not a DeepSeek-V3 architecture: engines need a model class that knows the extra
norms (e.g. openPangu's); the round trip is exact either way.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from config import ConfigError, from_dict
from moe.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
         "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj", "wq": "q_proj", "wk": "k_proj",
         "wv": "v_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
          "attn_post_norm": "post_self_attn_layernorm", "mlp_post_norm": "post_mlp_layernorm"}
_EXPERTS = {"w1_EDF": "gate_proj", "w3_EDF": "up_proj", "w2_EFD": "down_proj"}


class HFError(ValueError):
    """An export or import cannot proceed; the message names the problem and the fix."""


# --- the tensor-level transforms ---------------------------------------------------------------

def _rope_rows(w: torch.Tensor, row_block: int, rope: int, to_hf: bool) -> torch.Tensor:
    """Reorder the last `rope` rows of every block of `row_block` rows: halves -> interleaved
    (to_hf) or back."""
    blocks = w.reshape(-1, row_block, *w.shape[1:])
    head, r = blocks[:, :row_block - rope], blocks[:, row_block - rope:]
    half = rope // 2
    if to_hf:
        r = torch.stack([r[:, :half], r[:, half:]], dim=2).reshape(r.shape)
    else:
        pairs = r.reshape(r.shape[0], half, 2, *r.shape[2:])
        r = torch.cat([pairs[:, :, 0], pairs[:, :, 1]], dim=1)
    return torch.cat([head, r], dim=1).reshape(w.shape)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=1)
    return torch.cat([b, a], dim=1).contiguous()


def _layer_map(cfg: ModelConfig, ours: str, hf: str) -> list[tuple[str, str, Callable, Callable]]:
    """(our name, HF name, to_hf, from_hf) for one transformer block's tensors."""
    same = lambda t: t  # noqa: E731
    out = []
    for o, h in _NORMS.items():
        if cfg.norm == "sandwich" or o in ("attn_norm", "mlp_norm"):
            out.append((f"{ours}.{o}.weight", f"{hf}.{h}.weight", same, same))
    attn = ["wq", "wk", "wv", "wo"] if cfg.attention == "gqa" else (
        ["wq_a", "q_norm", "wq_b"] if cfg.q_lora_rank > 0 else ["wq"]) + ["wkv_a", "kv_norm", "wkv_b", "wo"]
    for o in attn:
        to, back = same, same
        if cfg.attention == "mla" and o in ("wq_b", "wq"):
            blk, rope = cfg.qk_head_dim, cfg.qk_rope_head_dim
            to, back = (lambda t, b=blk, r=rope: _rope_rows(t, b, r, True)), (lambda t, b=blk, r=rope: _rope_rows(t, b, r, False))
        elif cfg.attention == "mla" and o == "wkv_a":
            blk, rope = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
            to, back = (lambda t, b=blk, r=rope: _rope_rows(t, b, r, True)), (lambda t, b=blk, r=rope: _rope_rows(t, b, r, False))
        out.append((f"{ours}.attn.{o}.weight", f"{hf}.self_attn.{_ATTN[o]}.weight", to, back))
    return out


def name_map(cfg: ModelConfig) -> list[tuple[str, str, Callable, Callable]]:
    """Every (our key, HF key, to_hf, from_hf) except the expert stacks (see `expert_map`)."""
    same = lambda t: t  # noqa: E731
    out = [("embed.weight", "model.embed_tokens.weight", same, same), ("norm.weight", "model.norm.weight", same, same)]
    if not cfg.tie_embeddings:
        out.append(("head.weight", "lm_head.weight", same, same))
    blocks = [(f"layers.{i}", f"model.layers.{i}", i >= cfg.first_k_dense) for i in range(cfg.num_layers)]
    blocks += [(f"mtp.{k}.block", f"model.layers.{cfg.num_layers + k}", cfg.num_moe_layers > 0)
               for k in range(cfg.mtp_layers)]
    for ours, hf, moe in blocks:
        out += _layer_map(cfg, ours, hf)
        if not moe:
            out += [(f"{ours}.mlp.{o}.weight", f"{hf}.mlp.{h}.weight", same, same) for o, h in _MLP.items()]
            continue
        out.append((f"{ours}.mlp.router.weight", f"{hf}.mlp.gate.weight", same, same))
        if cfg.expert_bias:
            out.append((f"{ours}.mlp.router.expert_bias", f"{hf}.mlp.gate.e_score_correction_bias", same, same))
        if cfg.num_shared_experts > 0:
            out += [(f"{ours}.mlp.shared.{o}.weight", f"{hf}.mlp.shared_experts.{h}.weight", same, same)
                    for o, h in _MLP.items()]
    for k in range(cfg.mtp_layers):
        hf = f"model.layers.{cfg.num_layers + k}"
        out += [(f"mtp.{k}.embed_norm.weight", f"{hf}.enorm.weight", same, same),
                (f"mtp.{k}.hidden_norm.weight", f"{hf}.hnorm.weight", same, same),
                (f"mtp.{k}.proj.weight", f"{hf}.eh_proj.weight", _swap_halves, _swap_halves),
                (f"mtp.{k}.norm.weight", f"{hf}.shared_head.norm.weight", same, same)]
    return out


def expert_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our stacked key, HF prefix "model.layers.i.mlp.experts") of every MoE block."""
    out = [(f"layers.{i}.mlp.experts", f"model.layers.{i}.mlp.experts") for i in range(cfg.first_k_dense, cfg.num_layers)]
    if cfg.num_moe_layers > 0:
        out += [(f"mtp.{k}.block.mlp.experts", f"model.layers.{cfg.num_layers + k}.mlp.experts")
                for k in range(cfg.mtp_layers)]
    return out


def _mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """HF keys DeepSeek-V3 repeats inside each MTP layer, and the shared tensor they copy."""
    head = "embed.weight" if cfg.tie_embeddings else "head.weight"
    out = []
    for k in range(cfg.mtp_layers):
        hf = f"model.layers.{cfg.num_layers + k}"
        out += [(f"{hf}.embed_tokens.weight", "embed.weight"), (f"{hf}.shared_head.head.weight", head)]
    return out


# --- config.json --------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.dense_ffn_size,
        "moe_intermediate_size": cfg.expert_ffn_size, "num_hidden_layers": cfg.num_layers,
        "num_nextn_predict_layers": cfg.mtp_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads if cfg.attention == "gqa" else cfg.num_heads,
        "n_shared_experts": cfg.num_shared_experts, "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": cfg.score_func, "topk_method": "noaux_tc" if cfg.expert_bias else "greedy",
        "n_group": cfg.n_group, "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
        "first_k_dense_replace": cfg.first_k_dense, "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "head_dim": cfg.head_dim if cfg.attention == "gqa" else cfg.qk_rope_head_dim,
        "rope_interleave": cfg.attention == "mla", "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "ultramoe": {"model": asdict(cfg), "sandwich_norm": cfg.norm == "sandwich", "attention": cfg.attention},
    }


def config_from_hf(conf: dict) -> ModelConfig:
    """Our ModelConfig from config.json: the `ultramoe` block when present, else DeepSeek fields."""
    if "ultramoe" in conf:
        return from_dict(ModelConfig, conf["ultramoe"]["model"], "config.json:ultramoe.model")
    try:
        fields = dict(
            vocab_size=conf["vocab_size"], hidden_size=conf["hidden_size"], num_layers=conf["num_hidden_layers"],
            max_seq_len=conf.get("max_position_embeddings", 4096), attention="mla", num_heads=conf["num_attention_heads"],
            q_lora_rank=conf.get("q_lora_rank") or 0, kv_lora_rank=conf["kv_lora_rank"],
            qk_nope_head_dim=conf["qk_nope_head_dim"], qk_rope_head_dim=conf["qk_rope_head_dim"],
            v_head_dim=conf["v_head_dim"], rope_theta=float(conf.get("rope_theta", 10000.0)),
            dense_ffn_size=conf["intermediate_size"], first_k_dense=conf.get("first_k_dense_replace", 0),
            num_experts=conf["n_routed_experts"], top_k=conf["num_experts_per_tok"],
            expert_ffn_size=conf["moe_intermediate_size"], num_shared_experts=conf.get("n_shared_experts") or 0,
            score_func=conf.get("scoring_func", "sigmoid"), norm_topk_prob=conf.get("norm_topk_prob", True),
            routed_scaling_factor=float(conf.get("routed_scaling_factor", 1.0)), n_group=conf.get("n_group") or 1,
            topk_group=conf.get("topk_group") or 1, expert_bias=conf.get("topk_method") == "noaux_tc",
            norm="pre", norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
            mtp_layers=conf.get("num_nextn_predict_layers", 0) or 0)
    except KeyError as e:
        raise HFError(f"config.json: missing {e.args[0]!r}; only DeepSeek-V3 style (MLA + MoE) configs can be "
                      "imported") from None
    if conf.get("rope_scaling"):
        raise HFError("config.json: rope_scaling (e.g. YaRN) is not supported by this model; remove it only if "
                      "the weights were trained without it")
    return from_dict(ModelConfig, fields, "config.json")


# --- export -------------------------------------------------------------------------------------

def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Our full (single-device) state dict -> HF tensors."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    out = {}
    for ours, hf, fwd, _ in name_map(cfg):
        out[hf] = cast(fwd(state[ours])).contiguous()
    for ours, hf in expert_map(cfg):
        for name, proj in _EXPERTS.items():
            stack = state[f"{ours}.{name}"]
            for j in range(stack.shape[0]):
                out[f"{hf}.{j}.{proj}.weight"] = cast(stack[j].t()).contiguous()
    for hf, ours in _mtp_copies(cfg):
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

    from launch.checkpoint import Checkpointer, load_model_weights
    from launch.recipe import CheckpointConfig
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


# --- import -------------------------------------------------------------------------------------

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
        for key, proj in _EXPERTS.items():
            mats = [take(f"{prefix}.{j}.{proj}.weight") for j in range(cfg.num_experts)]
            if all(m is not None for m in mats):
                out[f"{ours}.{key}"] = torch.stack([m.t() for m in mats]).contiguous()
    for name, _ in _mtp_copies(cfg):  # copies of the shared embedding / head: optional
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

    from launch.checkpoint import Checkpointer
    from launch.recipe import CheckpointConfig
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
    ap = argparse.ArgumentParser(prog="ultramoe export-hf", description="Export a training checkpoint's model "
                                 "to Hugging Face layout (config.json + safetensors, DeepSeek-V3 names).")
    ap.add_argument("--checkpoint", required=True, help="a step-N checkpoint directory, or a checkpoint root "
                    "(its newest complete checkpoint is used)")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (GB)")
    args = ap.parse_args(argv)
    from launch.checkpoint import CheckpointError
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * (1 << 30)))
    except (HFError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def import_main(argv: Optional[list[str]] = None) -> int:
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
