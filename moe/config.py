"""Typed configuration: the model shape dataclass and the strict YAML/dict loader.

Every config object in the project (model, training, parallel layout, hardware) is a dataclass that
is built through `from_dict`, which rejects unknown keys and wrong types with one clear message that
names the field, and then calls the dataclass's own `validate()` for cross-field rules.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration is invalid. The message names the field and how to fix it."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly: unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key}: unknown field for {cls.__name__}{hint}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required field of {cls.__name__} is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of fields")
    return data


def _need(cond: bool, field_path: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_path}: {message}")


@dataclass
class ModelConfig:
    """Shape and behaviour of the MoE transformer. Defaults give a tiny CPU model."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    max_seq_len: int = 256
    # attention
    attention: Literal["mla", "gqa"] = "mla"
    num_heads: int = 4
    num_kv_heads: int = 4  # GQA only
    head_dim: int = 16  # GQA only
    q_lora_rank: int = 32  # MLA; 0 means queries are projected directly
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    # feed-forward
    dense_ffn_size: int = 128
    first_k_dense: int = 1
    # mixture of experts
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int = 32
    num_shared_experts: int = 1
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts split into n_group groups
    topk_group: int = 1  # tokens may only use experts of their best topk_group groups
    expert_bias: bool = False  # aux-loss-free balancing: bias used for selection only
    bias_update_speed: float = 1e-3
    capacity_factor: Optional[float] = None  # None = dropless
    aux_loss_coeff: float = 1e-2
    aux_loss_scope: Literal["micro_batch", "sequence", "group"] = "micro_batch"
    z_loss_coeff: float = 0.0
    # normalisation and initialisation
    norm: Literal["sandwich", "pre"] = "sandwich"
    norm_eps: float = 1e-5
    dssn_attn_c: float = 0.283
    dssn_mlp_c: float = 0.432
    init: Literal["tiny", "standard"] = "tiny"
    init_std: float = 0.02  # standard init only
    embed_std: float = 0.5  # TinyInit embedding std
    tie_embeddings: bool = False
    # multi-token prediction
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.3
    # pad the layer count with identity layers (pipeline balance); counted nowhere else
    noop_layers: int = 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len", "num_heads",
                     "dense_ffn_size", "expert_ffn_size", "num_experts", "top_k"):
            _need(getattr(self, name) > 0, p + name, f"must be positive, got {getattr(self, name)}")
        for name in ("first_k_dense", "num_shared_experts", "mtp_layers", "noop_layers", "q_lora_rank"):
            _need(getattr(self, name) >= 0, p + name, f"must be >= 0, got {getattr(self, name)}")
        _need(self.first_k_dense <= self.num_layers, p + "first_k_dense",
              f"{self.first_k_dense} exceeds num_layers={self.num_layers}")
        _need(self.top_k <= self.num_experts, p + "top_k",
              f"top_k={self.top_k} exceeds num_experts={self.num_experts}; lower top_k or add experts")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _need(getattr(self, name) > 0, p + name, f"must be positive for MLA, got {getattr(self, name)}")
            _need(self.qk_rope_head_dim % 2 == 0, p + "qk_rope_head_dim",
                  f"RoPE needs an even dimension, got {self.qk_rope_head_dim}")
        else:
            _need(self.head_dim > 0 and self.head_dim % 2 == 0, p + "head_dim",
                  f"must be positive and even for RoPE, got {self.head_dim}")
            _need(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, p + "num_kv_heads",
                  f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        _need(self.n_group >= 1 and self.num_experts % self.n_group == 0, p + "n_group",
              f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        _need(1 <= self.topk_group <= self.n_group, p + "topk_group",
              f"must be between 1 and n_group={self.n_group}, got {self.topk_group}")
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            _need(self.topk_group * per_group >= self.top_k, p + "topk_group",
                  f"topk_group={self.topk_group} groups of {per_group} experts cannot supply top_k={self.top_k}")
        if self.capacity_factor is not None:
            _need(self.capacity_factor > 0, p + "capacity_factor",
                  f"must be positive (or null for dropless), got {self.capacity_factor}")
        _need(self.norm_eps > 0, p + "norm_eps", f"must be positive, got {self.norm_eps}")
        _need(self.routed_scaling_factor > 0, p + "routed_scaling_factor",
              f"must be positive, got {self.routed_scaling_factor}")
        for name in ("aux_loss_coeff", "z_loss_coeff", "mtp_loss_weight", "bias_update_speed"):
            _need(getattr(self, name) >= 0, p + name, f"must be >= 0, got {getattr(self, name)}")


def load_model_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, load_yaml(path), "model")
