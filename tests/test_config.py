"""Config validation: every bad config gets one clear message naming the field; good ones load."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.trainer.recipe import load_recipe
from config import ConfigError, from_dict
from moe.config import ModelConfig, load_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad, message", [
    ({"hidden_sise": 64}, "hidden_sise: unknown field for ModelConfig; did you mean 'hidden_size'?"),
    ({"num_layers": "four"}, "num_layers: expected an integer, got 'four'"),
    ({"num_layers": 4.5}, "num_layers: expected an integer, got 4.5"),
    ({"attention": "mha"}, "attention: got 'mha'; allowed: one of 'mla', 'gqa'"),
    ({"top_k": 9, "num_experts": 8}, "top_k: top_k=9 exceeds num_experts=8"),
    ({"num_experts": 10, "n_group": 4}, "n_group: num_experts=10 must be divisible by n_group=4"),
    ({"n_group": 4, "topk_group": 5}, "topk_group: must be between 1 and n_group=4, got 5"),
    ({"n_group": 4, "topk_group": 1, "top_k": 3}, "topk_group: topk_group=1 groups of 2 experts cannot supply top_k=3"),
    ({"attention": "gqa", "num_heads": 6, "num_kv_heads": 4}, "num_kv_heads: num_heads=6 must be a multiple of num_kv_heads=4"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim: RoPE needs an even dimension, got 7"),
    ({"first_k_dense": 9, "num_layers": 4}, "first_k_dense: 9 exceeds num_layers=4"),
    ({"capacity_factor": -1.0}, "capacity_factor: must be positive (or null for dropless), got -1.0"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob: expected true or false, got 'yes'"),
    ({"hidden_size": 0}, "hidden_size: must be positive, got 0"),
    ({"score_func": "relu"}, "score_func: got 'relu'; allowed: one of 'softmax', 'sigmoid'"),
    ({"aux_loss_scope": "global"}, "aux_loss_scope: got 'global'; allowed: one of 'micro_batch', 'sequence', 'group'"),
])
def test_bad_model_config_message(bad, message):
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, bad, "model")
    assert str(e.value).startswith("model." + message)


def _write(tmp_path, data):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("bad, message", [
    ({"train": {"seq_len": 1024}}, "train.seq_len: 1024 exceeds model.max_seq_len=256"),
    ({"train": {"steps": 0}}, "train.steps: must be >= 1, got 0"),
    ({"train": {"lr": 1e-3, "min_lr": 1e-2}}, "train.min_lr: need 0 <= min_lr <= lr"),
    ({"train": {"dtype": "fp16"}}, "train.dtype: got 'fp16'; allowed: one of 'fp32', 'bf16'"),
    ({"trian": {}}, "trian: unknown field for Recipe; did you mean 'train'?"),
    ({"data": {"path": "/nonexistent/corpus"}}, "data.path: Megatron dataset /nonexistent/corpus.bin not found"),
    ({"parallel": {"ep": 0}}, "parallel.ep: must be >= 1, got 0"),
    ({"model": "missing_model.yaml"}, "model: file 'missing_model.yaml' not found"),
])
def test_bad_recipe_message(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_recipe(_write(tmp_path, bad))
    assert message in str(e.value)


def test_not_yaml_and_not_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_model_config(p)
    p.write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(p)


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs" / "models").glob("*.yaml")):
        load_model_config(path)
    for path in sorted((ROOT / "configs" / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_overrides_apply_and_are_validated():
    r = load_recipe(ROOT / "configs/recipes/tiny_cpu.yaml", {"train.steps": 30, "model.top_k": 1})
    assert r.train.steps == 30 and r.model.top_k == 1  # (steps must cover the recipe's 15 warm-up steps)
    with pytest.raises(ConfigError, match="train.stepz: unknown field"):
        load_recipe(ROOT / "configs/recipes/tiny_cpu.yaml", {"train.stepz": 3})


def test_cli_reports_config_error_without_traceback(tmp_path):
    p = _write(tmp_path, {"model": {"top_k": 99}})
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--recipe", str(p)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: model.top_k: top_k=99 exceeds num_experts=8; lower top_k or add experts"
