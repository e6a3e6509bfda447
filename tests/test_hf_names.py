"""The Hugging Face name map (moe/hf_names.py) covers every tensor of our models and nothing else,
one to one: a renamed or added module in moe/ fails here, not silently in an export."""
from __future__ import annotations

import pytest
import torch

from moe.config import ModelConfig
from moe.hf_names import EXPERT_PROJ, expert_map, mtp_copies, name_map
from moe.model import MoETransformer
from test_hf_export import BASE  # the small MLA/MoE shape the export tests use

CONFIGS = {
    "mla-sandwich-mtp-bias-shared-dense1": dict(mtp_layers=1, expert_bias=True, score_func="sigmoid"),
    "mla-direct-q-prenorm-tied-mtp2": dict(q_lora_rank=0, norm="pre", tie_embeddings=True, mtp_layers=2),
    "gqa-no-shared-no-mtp": dict(attention="gqa", num_kv_heads=1, head_dim=8, num_shared_experts=0),
    "all-moe-no-dense": dict(first_k_dense=0, mtp_layers=1, expert_bias=True),
    "all-dense": dict(first_k_dense=3, mtp_layers=1),
    "tiny-recipe-model": {},  # configs/models/tiny_moe.yaml
}


def _cfg(case: str) -> ModelConfig:
    if case == "tiny-recipe-model":
        from launch.trainer.recipe import load_recipe
        return load_recipe("configs/recipes/tiny_cpu.yaml").model
    return ModelConfig(**{**BASE, **CONFIGS[case]})


def _pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """Every (our state-dict key, HF key), expert stacks expanded per expert."""
    pairs = [(ours, hf) for ours, hf, _, _ in name_map(cfg)]
    for ours, hf in expert_map(cfg):
        pairs += [(f"{ours}.{key}", f"{hf}.{j}.{proj}.weight")
                  for key, proj in EXPERT_PROJ.items() for j in range(cfg.num_experts)]
    return pairs


@pytest.mark.parametrize("case", CONFIGS, ids=list(CONFIGS))
def test_every_parameter_maps_to_an_hf_name_and_back(case):
    cfg = _cfg(case)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    ours = set(model.state_dict())
    pairs = _pairs(cfg)
    mapped = {o for o, _ in pairs}
    # Without aux-loss-free balancing the routers' (zero) bias buffers have no HF tensor.
    unmapped_ok = set() if cfg.expert_bias else {k for k in ours if k.endswith(".router.expert_bias")}
    assert ours - unmapped_ok <= mapped, f"no HF name for {sorted(ours - unmapped_ok - mapped)}"
    assert mapped <= ours, f"the map names tensors the model does not have: {sorted(mapped - ours)}"
    hf_names = [h for _, h in pairs] + [h for h, _ in mtp_copies(cfg)]
    assert len(hf_names) == len(set(hf_names)), "two of our tensors map to one HF name"
    back = {h: o for o, h in pairs}
    stacked = {o for o, _ in pairs if o.split(".")[-1] in EXPERT_PROJ}
    for o, h in pairs:
        assert back[h] == o
        assert o in stacked or sum(1 for p, _ in pairs if p == o) == 1, f"{o} maps to several HF names"
    for _, source in mtp_copies(cfg):
        assert source in ours
