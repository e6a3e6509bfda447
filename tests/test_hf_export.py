"""Hugging Face export/import: DeepSeek-V3 tensor names, exact round trips (in memory, through a
training checkpoint, through the CLI), RoPE reordering that preserves attention scores, which
models are labelled DeepSeek-V3, and one clear line for each bad input. Against transformers itself:
tests/test_hf_transformers.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
import yaml

from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.resume import load_model_weights
from launch.cli import main as cli
from launch.hf.config import HFError, hf_config, transformers_gaps
from launch.hf.export import save_hf, to_hf
from launch.hf.import_ import read_hf
from launch.trainer.recipe import CheckpointConfig, TrainConfig
from launch.trainer.setup import build_optimizer
from moe.config import ModelConfig, load_model_config
from moe.hf_names import rope_rows
from moe.model import MoETransformer

BASE = dict(vocab_size=64, hidden_size=32, num_layers=3, max_seq_len=32, num_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
            first_k_dense=1, num_experts=4, top_k=2, expert_ffn_size=16, num_shared_experts=1)
CASES = {
    "mla-sandwich-mtp-bias": dict(mtp_layers=1, expert_bias=True, score_func="sigmoid"),
    "mla-direct-q-prenorm-tied": dict(q_lora_rank=0, norm="pre", tie_embeddings=True, mtp_layers=2),
    "gqa-no-shared": dict(attention="gqa", num_kv_heads=1, head_dim=8, num_shared_experts=0),
}


def _model(**over) -> MoETransformer:
    torch.manual_seed(0)
    m = MoETransformer(ModelConfig(**{**BASE, **over}))
    with torch.no_grad():  # non-trivial norm gains and biases, so a swapped name would show
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for layer in m.moe_layers():
            layer.router.expert_bias.normal_()
        if not m.cfg.expert_bias:
            for layer in m.moe_layers():
                layer.router.expert_bias.zero_()  # without aux-free balancing the bias stays 0
    return m


def _checkpoint(model: MoETransformer, root, step: int = 7) -> None:
    Checkpointer(CheckpointConfig(), root, log=False).save(
        step, model, build_optimizer(model, TrainConfig()), {"tokens": 0}, yaml.safe_dump({"model": asdict(model.cfg)}))


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def _assert_same(state: dict, model: MoETransformer) -> None:
    want = model.state_dict()
    assert set(state) == set(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_round_trip_is_exact(tmp_path, case):
    model = _model(**CASES[case])
    save_hf(to_hf(model.state_dict(), model.cfg), model.cfg, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    cfg, state = read_hf(tmp_path / "hf")
    assert cfg == model.cfg
    _assert_same(state, model)


def test_deepseek_v3_names_and_shapes(tmp_path):
    model = _model(**CASES["mla-sandwich-mtp-bias"])
    hf = to_hf(model.state_dict(), model.cfg)
    d, f, e = 32, 16, 4
    layer = "model.layers.1"  # the first MoE layer
    expect = {
        "model.embed_tokens.weight": (64, d), "lm_head.weight": (64, d), "model.norm.weight": (d,),
        f"{layer}.self_attn.q_a_proj.weight": (16, d), f"{layer}.self_attn.q_a_layernorm.weight": (16,),
        f"{layer}.self_attn.q_b_proj.weight": (2 * 12, 16), f"{layer}.self_attn.kv_a_proj_with_mqa.weight": (16 + 4, d),
        f"{layer}.self_attn.kv_a_layernorm.weight": (16,), f"{layer}.self_attn.kv_b_proj.weight": (2 * 16, 16),
        f"{layer}.self_attn.o_proj.weight": (d, 2 * 8), f"{layer}.mlp.gate.weight": (e, d),
        f"{layer}.mlp.gate.e_score_correction_bias": (e,),
        f"{layer}.mlp.experts.3.gate_proj.weight": (f, d), f"{layer}.mlp.experts.3.up_proj.weight": (f, d),
        f"{layer}.mlp.experts.3.down_proj.weight": (d, f), f"{layer}.mlp.shared_experts.gate_proj.weight": (f, d),
        f"{layer}.mlp.shared_experts.down_proj.weight": (d, f), f"{layer}.input_layernorm.weight": (d,),
        f"{layer}.post_attention_layernorm.weight": (d,), f"{layer}.post_self_attn_layernorm.weight": (d,),
        f"{layer}.post_mlp_layernorm.weight": (d,), "model.layers.0.mlp.gate_proj.weight": (64, d),
        "model.layers.3.enorm.weight": (d,), "model.layers.3.hnorm.weight": (d,),
        "model.layers.3.eh_proj.weight": (d, 2 * d), "model.layers.3.shared_head.norm.weight": (d,),
        "model.layers.3.shared_head.head.weight": (64, d), "model.layers.3.embed_tokens.weight": (64, d),
        "model.layers.3.mlp.experts.0.down_proj.weight": (d, f),
    }
    for name, shape in expect.items():
        assert tuple(hf[name].shape) == shape, name
    ex = model.layers[1].mlp.experts
    assert torch.equal(hf[f"{layer}.mlp.experts.3.gate_proj.weight"], ex.w1_EDF[3].t())
    assert torch.equal(hf[f"{layer}.mlp.experts.3.down_proj.weight"], ex.w2_EFD[3].t())
    # DeepSeek's eh_proj reads [embedding, hidden]; ours reads [hidden, embedding]
    assert torch.equal(hf["model.layers.3.eh_proj.weight"][:, :d], model.mtp[0].proj.weight[:, d:])
    conf = json.loads(json.dumps(hf_config(model.cfg, torch.float32)))
    assert conf["n_routed_experts"] == e and conf["topk_method"] == "noaux_tc"
    # sandwich norm, softmax routing, MTP: not what DeepseekV3ForCausalLM computes, so not labelled so
    assert conf["model_type"] == "ultramoe" and conf["architectures"] == ["UltraMoEForCausalLM"]
    assert not conf["ultramoe"]["transformers_loadable"] and len(conf["ultramoe"]["transformers_gaps"]) == 3
    assert conf["num_nextn_predict_layers"] == 1 and conf["first_k_dense_replace"] == 1 and conf["rope_interleave"]


def _rope_half(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    ang = pos[:, None] * (10000.0 ** (-torch.arange(half) / half))[None]
    cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _rope_interleaved(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """GPT-J / DeepSeek-V3 convention: channels (2c, 2c+1) rotate together at frequency c."""
    half = x.shape[-1] // 2
    ang = pos[:, None] * (10000.0 ** (-torch.arange(half) / half))[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_rope_reordering_preserves_attention_scores():
    # Rope channels of q (rows of q_b_proj) and of the shared key (rows of kv_a_proj_with_mqa):
    # scores with our rotate-half on our weights == scores with interleaved RoPE on exported weights.
    torch.manual_seed(0)
    rope, nope, lat = 8, 4, 6
    wq = torch.randn(2 * (nope + rope), 5)  # 2 heads
    wk = torch.randn(lat + rope, 5)
    x, pos = torch.randn(7, 5), torch.arange(7.0)
    q_ours = (x @ wq.t()).view(7, 2, nope + rope)[..., nope:]
    k_ours = (x @ wk.t())[:, lat:]
    q_hf = (x @ rope_rows(wq, nope + rope, rope, True).t()).view(7, 2, nope + rope)[..., nope:]
    k_hf = (x @ rope_rows(wk, lat + rope, rope, True).t())[:, lat:]
    ours = torch.einsum("hsd,td->hst", _rope_half(q_ours.transpose(0, 1), pos), _rope_half(k_ours, pos))
    theirs = torch.einsum("hsd,td->hst", _rope_interleaved(q_hf.transpose(0, 1), pos), _rope_interleaved(k_hf, pos))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(rope_rows(rope_rows(wq, nope + rope, rope, True), nope + rope, rope, False), wq)


def test_cli_export_from_checkpoint_and_import_back(tmp_path, capsys):
    model = _model(**CASES["mla-sandwich-mtp-bias"])
    _checkpoint(model, tmp_path / "ck")
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"),
                "--not-for-transformers"]) == 0  # sandwich norm: transformers cannot compute it
    cfg, state = read_hf(tmp_path / "hf")
    _assert_same(state, model)
    assert cli(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    assert "checkpoint.resume=" in capsys.readouterr().out
    fresh = MoETransformer(cfg)
    info = load_model_weights(tmp_path / "imported" / "step-00000000", fresh)
    assert info["kind"] == "weights"
    _assert_same(fresh.state_dict(), model)
    # a weights-only checkpoint restores the model and leaves the optimizer fresh
    target = MoETransformer(cfg)
    opt = build_optimizer(target, TrainConfig())
    assert Checkpointer(CheckpointConfig(), tmp_path / "imported", log=False).load(target, opt)["step"] == 0
    _assert_same(target.state_dict(), model)
    assert all(float(s["step"]) == 0 for s in opt.state.values())


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    model = _model()
    hf = to_hf(model.state_dict(), model.cfg)
    del hf["model.layers.2.mlp.experts.1.up_proj.weight"]
    hf["model.layers.9.self_attn.o_proj.weight"] = torch.zeros(1)
    save_hf(hf, model.cfg, tmp_path / "hf")
    with pytest.raises(HFError, match=r"missing 1 tensors \(e\.g\. model\.layers\.2\.mlp\.experts\.1\.up_proj\.weight\)"
                       r"; 1 unexpected tensors \(e\.g\. model\.layers\.9\.self_attn\.o_proj\.weight\)"):
        read_hf(tmp_path / "hf")
    with pytest.raises(HFError, match="exists and is not empty; choose another --out"):
        save_hf(hf, model.cfg, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HFError, match=r"model\.safetensors: unreadable safetensors file"):
        read_hf(tmp_path / "hf")
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint" in err[0]
    assert not (tmp_path / "o").exists()


FAITHFUL = dict(norm="pre", score_func="sigmoid", norm_eps=1e-6)  # what DeepseekV3ForCausalLM computes
GAPS = {"attention=gqa": dict(attention="gqa", num_kv_heads=1, head_dim=8), "norm=sandwich": dict(norm="sandwich"),
        "score_func=softmax": dict(score_func="softmax"), "norm_eps=1e-05": dict(norm_eps=1e-5),
        "capacity_factor=1.0": dict(capacity_factor=1.0), "mtp_layers=1": dict(mtp_layers=1),
        "n_group=4": dict(n_group=4, topk_group=2)}


@pytest.mark.parametrize("gap", GAPS, ids=list(GAPS))
def test_only_models_transformers_computes_are_labelled_deepseek_v3(gap):
    assert transformers_gaps(ModelConfig(**{**BASE, **FAITHFUL})) == []
    assert hf_config(ModelConfig(**{**BASE, **FAITHFUL}), torch.float32)["model_type"] == "deepseek_v3"
    cfg = ModelConfig(**{**BASE, **FAITHFUL, **GAPS[gap]})
    gaps = transformers_gaps(cfg)
    assert len(gaps) == 1 and gaps[0].startswith(gap), gaps
    assert hf_config(cfg, torch.float32)["model_type"] == "ultramoe"


def test_which_shipped_models_export_faithfully():
    # README's HF section: DeepSeek-V3 with --drop-mtp; Pangu and the tiny model only marked
    ds = load_model_config("configs/models/deepseek_v3_671b.yaml")
    assert [g.split(" ")[0] for g in transformers_gaps(ds)] == ["mtp_layers=1"]
    assert transformers_gaps(replace(ds, mtp_layers=0)) == []
    for name in ("pangu_ultra_moe_718b", "tiny_moe"):
        assert "norm=sandwich" in " ".join(transformers_gaps(load_model_config(f"configs/models/{name}.yaml")))


def test_export_refuses_what_transformers_cannot_compute(tmp_path, capsys):
    _checkpoint(_model(), tmp_path / "ck")  # sandwich norm, softmax routing
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 2
    err = _one_error_line(capsys)
    assert "compute something else: norm_eps=1e-05" in err and "norm=sandwich" in err and "score_func=softmax" in err
    assert "--not-for-transformers" in err and "--drop-mtp" not in err and not (tmp_path / "hf").exists()
    # MTP alone: --drop-mtp gives a faithful export of the main model
    _checkpoint(_model(**FAITHFUL, mtp_layers=2), tmp_path / "ck2")
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck2"), "--out", str(tmp_path / "hf")]) == 2
    assert "Pass --drop-mtp" in _one_error_line(capsys)
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck2"), "--out", str(tmp_path / "hf"), "--drop-mtp"]) == 0
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "deepseek_v3" and conf["num_nextn_predict_layers"] == 0
    cfg, _ = read_hf(tmp_path / "hf")
    assert cfg.mtp_layers == 0


def test_export_out_naming_a_file_is_one_line(tmp_path, capsys):
    _checkpoint(_model(), tmp_path / "ck")
    (tmp_path / "f").write_text("keep me")
    for out, says in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "Not a directory")):
        assert cli(["export-hf", "--checkpoint", str(tmp_path / "ck"), "--out", str(out),
                    "--not-for-transformers"]) == 2
        assert says in _one_error_line(capsys)
    assert (tmp_path / "f").read_text() == "keep me"


BROKEN_CONFIGS = {
    "truncated": b'{"vocab_size": 64, "hidden_size"',
    "not-utf8": b"\xff\xfe\x00garbage",
    "a-list": b"[1, 2, 3]",
    "missing-field": json.dumps({"model_type": "deepseek_v3", "vocab_size": 64}).encode(),
    "wrong-type": None,  # hidden_size as a string, built below
    "bad-rope-parameters": None,
    "ultramoe-block-garbage": json.dumps({"ultramoe": "x"}).encode(),
    "ultramoe-unknown-field": json.dumps({"ultramoe": {"model": {"hidden_sise": 3}}}).encode(),
}


@pytest.mark.parametrize("case", BROKEN_CONFIGS, ids=list(BROKEN_CONFIGS))
def test_import_broken_config_json_is_one_line(tmp_path, capsys, case):
    model = _model(**FAITHFUL)
    save_hf(to_hf(model.state_dict(), model.cfg), model.cfg, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    del conf["ultramoe"]
    text = BROKEN_CONFIGS[case]
    if case == "wrong-type":
        text = json.dumps({**conf, "hidden_size": "thirty-two"}).encode()
    elif case == "bad-rope-parameters":
        text = json.dumps({**conf, "rope_parameters": [10000.0]}).encode()
    (tmp_path / "hf" / "config.json").write_bytes(text)
    assert cli(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 2
    assert "config.json" in _one_error_line(capsys)
    assert not (tmp_path / "ck").exists()


def test_deepseek_style_config_without_mtp_weights_or_topk_method_imports(tmp_path, capsys):
    # what transformers writes: num_nextn_predict_layers 1 (its default) without MTP tensors, no
    # topk_method, and the selection bias it always applies
    model = _model(**FAITHFUL, expert_bias=True)
    save_hf(to_hf(model.state_dict(), model.cfg), model.cfg, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("ultramoe", "topk_method", "scoring_func", "rope_theta"):
        del conf[key]
    conf["num_nextn_predict_layers"] = 1
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    assert cli(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert "note: config.json declares num_nextn_predict_layers=1" in capsys.readouterr().out
    cfg, state = read_hf(tmp_path / "hf")
    assert cfg == model.cfg
    _assert_same(state, model)
    # greedy routing (no bias) must come with a zero bias: anything else would be dropped silently
    conf["topk_method"] = "greedy"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(HFError, match="e_score_correction_bias is not zero but config.json's topk_method"):
        read_hf(tmp_path / "hf")


def test_import_into_an_existing_run_needs_force(tmp_path, capsys):
    model = _model(**FAITHFUL)
    save_hf(to_hf(model.state_dict(), model.cfg), model.cfg, tmp_path / "hf")
    _checkpoint(model, tmp_path / "run", step=7)
    args = ["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]
    assert cli(args) == 2
    err = _one_error_line(capsys)
    assert "already holds 1 checkpoint(s), newest step-00000007" in err and "--force" in err
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000007"
    assert not (tmp_path / "run" / "step-00000000").exists()
    assert cli(args + ["--force"]) == 0
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000000"
    (tmp_path / "file").write_text("x")
    assert cli(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in _one_error_line(capsys)
