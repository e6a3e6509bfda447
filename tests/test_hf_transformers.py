"""Both directions against the real client, transformers' DeepseekV3ForCausalLM (a dev dependency):
our export loaded by AutoModelForCausalLM gives our logits, a model transformers created and saved
imports and gives its logits (max abs diff < 1e-4, fp32), and an export transformers cannot compute
is refused, or marked so that transformers refuses to load it."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from config import from_dict
from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.resume import load_model_weights
from launch.cli import main as cli
from launch.hf.export import export_checkpoint
from launch.trainer.recipe import CheckpointConfig, TrainConfig
from launch.trainer.setup import build_optimizer
from moe.config import ModelConfig
from moe.model import MoETransformer
from test_hf_export import _model

TOL = 1e-4
FAITHFUL = {  # pre-norm MLA, sigmoid routing, eps 1e-6: what DeepseekV3ForCausalLM computes
    # selection bias, group-limited top-k, scaling, two shared experts, non-default RoPE base; the MTP
    # module is left out with --drop-mtp
    "bias-groups-mtp-dropped": dict(norm="pre", score_func="sigmoid", norm_eps=1e-6, expert_bias=True,
                                    n_group=2, topk_group=1, routed_scaling_factor=2.5, num_shared_experts=2,
                                    rope_theta=5000.0, mtp_layers=1),
    # direct queries, tied head, no selection bias (the unused buffer holds noise: zeros are written),
    # unnormalised top-k weights, no dense layer, no shared expert
    "direct-q-tied-no-bias": dict(norm="pre", score_func="sigmoid", norm_eps=1e-6, q_lora_rank=0,
                                  tie_embeddings=True, embed_std=0.1, norm_topk_prob=False, first_k_dense=0,
                                  num_shared_experts=0),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local directories only: never the network
    transformers.logging.set_verbosity_error()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def _checkpoint(model: MoETransformer, root) -> None:
    from dataclasses import asdict
    Checkpointer(CheckpointConfig(), root, log=False).save(
        3, model, build_optimizer(model, TrainConfig()), {"tokens": 0}, yaml.safe_dump({"model": asdict(model.cfg)}))


@pytest.mark.parametrize("case", FAITHFUL, ids=list(FAITHFUL))
def test_our_export_gives_our_logits_in_transformers(tmp_path, case):
    model = _model(**FAITHFUL[case]).eval()
    if not model.cfg.expert_bias:
        for layer in model.moe_layers():
            layer.router.expert_bias.normal_()  # ignored by our router; transformers must see zeros
    _checkpoint(model, tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "hf", drop_mtp=True)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["DeepseekV3ForCausalLM"] and conf["num_nextn_predict_layers"] == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        ours, hf = model(_tokens(), return_logits=True).logits, theirs(_tokens()).logits
    assert ours.abs().max() > 1.0  # logits large enough for a wrong norm or route to show
    print(f"{case}: max abs logit diff {(ours - hf).abs().max().item():.1e}")  # with -s: 3e-7, 5e-7
    assert (ours - hf).abs().max().item() < TOL


def _hf_model() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    conf = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=2,
        topk_group=1, first_k_dense_replace=1, max_position_embeddings=64, rope_theta=5000.0,
        initializer_range=0.2, num_nextn_predict_layers=1)  # the default of recent releases, never written
    model = DeepseekV3ForCausalLM(conf).eval()
    with torch.no_grad():  # non-trivial norm gains and selection biases, so a dropped one would show
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                t.add_(torch.randn_like(t) * 0.2)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * 0.5)
    return model


def test_model_saved_by_transformers_imports_with_its_logits(tmp_path, capsys):
    theirs = _hf_model()
    theirs.save_pretrained(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    # what tripped the importer: an MTP layer declared but never written, and no topk_method
    assert conf["num_nextn_predict_layers"] == 1 and "topk_method" not in conf
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert not any(".layers.3." in name for name in f.keys())
    assert cli(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert "imported without MTP" in capsys.readouterr().out
    step0 = tmp_path / "ck" / "step-00000000"
    cfg = from_dict(ModelConfig, yaml.safe_load((step0 / "recipe.yaml").read_text())["model"])
    assert cfg.expert_bias and cfg.mtp_layers == 0 and cfg.rope_theta == 5000.0
    ours = MoETransformer(cfg).eval()
    load_model_weights(step0, ours)
    with torch.no_grad():
        a, b = ours(_tokens(), return_logits=True).logits, theirs(_tokens()).logits
    assert b.abs().max() > 1.0
    print(f"saved by transformers: max abs logit diff {(a - b).abs().max().item():.1e}")  # 2e-6
    assert (a - b).abs().max().item() < TOL


def test_export_transformers_cannot_compute_is_refused_or_marked(tmp_path, capsys):
    model = _model(mtp_layers=1)  # sandwich norm, softmax routing, MTP
    _checkpoint(model, tmp_path / "ck")
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm=sandwich" in err[0] and "score_func=softmax" in err[0], err
    assert "--not-for-transformers" in err[0] and not (tmp_path / "hf").exists()
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
                "--not-for-transformers"]) == 0
    with pytest.raises((ValueError, KeyError)):  # transformers refuses it instead of computing something else
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
